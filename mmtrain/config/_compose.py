"""``load``: compose a recipe config with Hydra's compose API and turn every failure into a one-line ConfigError.

Search path: the folder of the chosen YAML file first, then the built-in ``configs/`` folder. So a built-in config
(``configs/<recipe>/<name>.yaml``) and a copied one (``./my.yaml``) both find the shared groups (``/model: ...``,
``model/attention=local``), and a user folder may shadow a group option with its own file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from mmtrain.config._paths import builtin_configs_dir, display_path, resolve_config, suggest
from mmtrain.config._state import one_line, remember_source, set_allow_any_target
from mmtrain.errors import ConfigError


def _check_yaml_file(path: Path, *, primary: bool) -> None:
    """Syntax errors with file and line; the top level must be a mapping (a primary config must not be empty)."""
    where = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8") from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error_line(e, where)) from e
    if content is None:
        if primary:
            raise ConfigError(f"{where}: the config file is empty (expected a mapping of keys)")
        return
    if not isinstance(content, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level, got a {type(content).__name__}")


def _yaml_error_line(error: yaml.YAMLError, where: str | None = None) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if where is None:
        where = display_path(mark.name) if mark is not None and mark.name and not mark.name.startswith("<") else "?"
    problem = getattr(error, "problem", None) or one_line(error)
    if mark is None:
        return f"{where}: YAML syntax error: {problem}"
    return f"{where}:{mark.line + 1}: YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _search_dirs(config_file: Path) -> list[Path]:
    dirs = [config_file.parent.resolve()]
    builtin = builtin_configs_dir()
    if builtin not in dirs:
        dirs.append(builtin)
    return dirs


def _searchpath_override(dirs: list[Path]) -> str:
    extra = [f"'file://{d.as_posix()}'" for d in dirs[1:]]
    return f"hydra.searchpath=[{','.join(extra)}]"


def _compose_raw(config_file: Path, overrides: list[str], dirs: list[Path]) -> DictConfig:
    """Plain Hydra compose (hydra node kept for the group choices); Hydra exceptions propagate."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_file.parent.resolve()), version_base="1.3", job_name="mmtrain"):
        return compose(config_file.stem, overrides=list(overrides) + [_searchpath_override(dirs)],
                       return_hydra_config=True)


def _all_keys(cfg, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg:
            path = f"{prefix}{k}"
            keys.append(path)
            child = cfg._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)):
                keys.extend(_all_keys(child, path + "."))
    return keys


def _group_options(group: str, dirs: list[Path]) -> list[str]:
    names: set[str] = set()
    for d in dirs:
        folder = d / group
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def _suggest_key(key: str, known: list[str]) -> str:
    """'did you mean' among the siblings of ``key`` when its parent exists, else among all key paths."""
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    if siblings and (not parent or parent in known):
        hint = suggest(leaf, siblings)
        return re.sub(r"'([^']+)'", lambda m: f"'{parent + '.' if parent else ''}{m.group(1)}'", hint)
    return suggest(key, known)


def _is_group(key: str, dirs: list[Path]) -> bool:
    return any((d / key).is_dir() for d in dirs)


class _Override:
    """One parsed command-line override and how Hydra will treat it."""

    def __init__(self, text: str, parsed, dirs: list[Path]):
        self.text = text
        self.parsed = parsed
        self.key = parsed.key_or_group
        self.is_group = parsed.package is not None or _is_group(self.key, dirs)
        self.is_plain_change = not (parsed.is_delete() or parsed.is_add() or parsed.is_force_add()
                                    or self.is_group or parsed.is_sweep_override())


def _quoting_hint(text: str) -> str:
    """How to pass an unparsable value as text: Hydra's grammar takes only some characters unquoted (no accented
    letters, brackets or spaces), any inside quotes."""
    key, sep, value = text.partition("=")
    if not sep or not value or value[0] in "'\"" or not re.fullmatch(r"[+~]{0,2}[\w.@/-]+", key):
        return ""
    if any(c in value for c in "'\"$`\\!"):
        return ""  # no shell spelling of the hint that is short and right
    return f"; to pass the value as text, quote it inside the argument: \"{key}='{value}'\""


def _parse_overrides(overrides: list[str], where: str, dirs: list[Path]) -> list[_Override]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    result = []
    for text in overrides:
        if not isinstance(text, str):
            raise ConfigError(f"{where}: override {text!r} must be a string like key=value")
        try:
            (parsed,) = parser.parse_overrides([text])
        except OverrideParseException as e:
            first = str(e).splitlines()[0] if str(e) else "invalid syntax"
            raise ConfigError(f"{where}: override '{text}': cannot parse ({first}); forms: key=value, +new.key=value, "
                              f"++key=value, ~key, group=option{_quoting_hint(text)}") from e
        result.append(_Override(text, parsed, dirs))
    return result


def _missing_config_error(message: str, where: str, overrides: list[_Override], dirs: list[Path]) -> ConfigError:
    """Hydra's 'Could not find group/option' -> which default or override, and the options that exist."""
    found = re.search(r"Could not find '([^']+)'", message)
    if not found:
        return ConfigError(f"{where}: {message.splitlines()[0]}")
    missing = found.group(1)
    group, _, option = missing.rpartition("/")
    if not group:
        return ConfigError(f"{where}: config '{missing}' not found")
    options = _group_options(group, dirs)
    hint = suggest(option, options) + f"; available in '{group}': {', '.join(options) if options else 'none'}"
    for o in overrides:
        if o.is_group and o.key == group:
            return ConfigError(f"{where}: override '{o.text}': no config '{option}' in group '{group}'{hint}")
    in_file = re.search(r"In '([^']+)'", message)
    owner = f" of '{in_file.group(1)}'" if in_file else ""
    return ConfigError(f"{where}: defaults list{owner}: no config '{option}' in group '{group}'{hint}")


def _struct_key_error(e: BaseException) -> str | None:
    """The full key path of an omegaconf 'not in struct' error behind ``e`` (a key a dict override adds), if any."""
    from omegaconf.errors import ConfigKeyError

    cause = e.__cause__
    while cause is not None:
        if isinstance(cause, ConfigKeyError) and "not in struct" in str(cause) and getattr(cause, "full_key", None):
            return str(cause.full_key)
        cause = cause.__cause__
    return None


def _composition_error(e: Exception, where: str, overrides: list[_Override], config_file: Path,
                       dirs: list[Path]) -> ConfigError:
    message = str(e)
    could_not = re.match(r"Could not override '([^']+)'", message)
    if could_not:
        key = could_not.group(1)
        matching = [o for o in overrides if o.key == key]
        text = matching[0].text if matching else key
        new_key = _struct_key_error(e)
        if new_key is not None and matching:
            # A dict merged into an existing node: the node exists, one of the dict's keys does not.
            known = _keys_without(config_file, [o for o in overrides if o.key != key], dirs, skip=key)
            value = text.split("=", 1)[1] if "=" in text else text
            leaf = new_key[len(key) + 1:] if new_key.startswith(key + ".") else new_key
            return ConfigError(f"{where}: override '{text}': '{key}' has no key '{leaf}'"
                               f"{_suggest_key(new_key, known)}; use '++{key}={value}' to add keys to it")
        if matching and matching[0].is_group:
            return ConfigError(f"{where}: override '{text}': group '{key}' is not in the config's defaults list; "
                               f"use '+{text}' to add it")
        known = _keys_without(config_file, overrides, dirs, skip=key)
        return ConfigError(f"{where}: override '{text}': key '{key}' does not exist in the config"
                           f"{_suggest_key(key, known)}; use '+{text.lstrip('+')}' to add a new key")
    deleting = re.match(r"Could not delete from config\. '([^']+)' does not exist", message)
    if deleting:
        key = deleting.group(1)
        known = _keys_without(config_file, overrides, dirs, skip=key)
        return ConfigError(f"{where}: override '~{key}': key '{key}' does not exist in the config{_suggest_key(key, known)}")
    appending = re.match(r"Could not append to config\. An item is already at '([^']+)'", message)
    if appending:
        key = appending.group(1)
        return ConfigError(f"{where}: override '+{key}=...': key '{key}' already exists; use '{key}=VALUE' to change "
                           f"it or '++{key}=VALUE' to add or change")
    if message.startswith("Config group override must be"):
        for o in overrides:
            if o.is_group and not isinstance(o.parsed.value(), (str, list)):
                options = _group_options(o.key, dirs)
                return ConfigError(f"{where}: override '{o.text}': '{o.key}' is a config group: give one of its "
                                   f"options ({', '.join(options) if options else 'none'}), or use "
                                   f"'{o.key}.KEY=VALUE' to change a value inside it")
    if "Could not find '" in message:
        return _missing_config_error(message, where, overrides, dirs)
    cause = e.__cause__
    detail = getattr(cause, "msg", None) or (str(cause) if cause else "") or message
    return ConfigError(f"{where}: {one_line(detail)}")


def _keys_without(config_file: Path, overrides: list[_Override], dirs: list[Path], skip: str) -> list[str]:
    """All key paths of the config composed without the failing value overrides (for 'did you mean')."""
    kept = [o.text for o in overrides if o.is_group]
    try:
        cfg = _compose_raw(config_file, kept, dirs)
    except Exception:  # noqa: BLE001  (the suggestion is best effort; the error being reported is the real one)
        return []
    return [k for k in _all_keys(cfg) if not k.startswith("hydra")]


def _kind(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (dict, DictConfig)):
        return "mapping"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    return type(value).__name__


def _compatible(old: str | None, new: str | None) -> bool:
    if old is None or new is None or old == new or old == "str":
        return True
    return old == "float" and new == "int"


def _raw_value(cfg: DictConfig, key: str):
    """The value at a dotted key without resolving interpolations; a sentinel when absent or '???'."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return _ABSENT
    if node._is_missing() or node._is_interpolation():
        return _ABSENT
    return node if isinstance(node, (DictConfig, ListConfig)) else node._value()


_ABSENT = object()


def _check_override_types(config_file: Path, overrides: list[_Override], dirs: list[Path], where: str) -> None:
    """A value override must keep the type the config gives the key (an int stays an int; a float takes an int)."""
    changes = [o for o in overrides if o.is_plain_change]
    if not changes:
        return
    base = _compose_raw(config_file, [o.text for o in overrides if not o.is_plain_change], dirs)
    for o in changes:
        old = _raw_value(base, o.key)
        if old is _ABSENT:
            continue
        new = o.parsed.value()
        if isinstance(new, str) and "${" in new:
            continue
        old_kind, new_kind = _kind(old), _kind(new)
        if not _compatible(old_kind, new_kind):
            shown = OmegaConf.to_container(old) if isinstance(old, (DictConfig, ListConfig)) else old
            raise ConfigError(f"{where}: override '{o.text}': type mismatch at key '{o.key}': the config has "
                              f"{old_kind} {shown!r}, the override gives {new_kind} {new!r}")


def _check_group_files(choices, dirs: list[Path]) -> None:
    for group, option in choices.items():
        if option is None or group.startswith("hydra"):
            continue
        for d in dirs:
            path = d / group / f"{option}.yaml"
            if path.is_file():
                _check_yaml_file(path, primary=False)
                break


def _check_missing_and_interpolations(cfg: DictConfig, where: str) -> None:
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{where}: key '{key}': cannot resolve interpolation: {str(e).splitlines()[0]}") from e
    if missing:
        keys = ", ".join(f"'{k}'" for k in missing)
        example = " ".join(f"{k}=VALUE" for k in missing[:2])
        raise ConfigError(f"{where}: key {keys} must be set (the config leaves it '???'); pass e.g. {example}")


def load(recipe: str | os.PathLike, config: str | os.PathLike, overrides=(), allow_any_target: bool = False) -> DictConfig:
    """Compose the config of ``recipe`` named (or found at) ``config`` with command-line ``overrides``.

    Args:
        recipe: built-in recipe name or path to its ``.py`` file (its stem selects ``configs/<stem>/``).
        config: built-in config name (``configs/<recipe>/<name>.yaml`` then ``configs/<name>.yaml``) or a YAML path.
        overrides: Hydra overrides: ``a.b=1``, ``+a.new=1``, ``++a.b=1``, ``~a.b``, ``model/attention=local``.
        allow_any_target: trust this config's ``_target_`` paths outside ``mmtrain.``/``torch.``/``torchvision.``
            (stored as the process setting that ``instantiate`` reads).

    Returns: the composed DictConfig (Hydra struct mode: unknown attribute reads raise; use ``cfg.get(k, d)``).
    Raises: ConfigError with one line naming the file, the key or override, and the cause.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    set_allow_any_target(allow_any_target)
    config_file = resolve_config(recipe, config)
    where = display_path(config_file)
    _check_yaml_file(config_file, primary=True)
    dirs = _search_dirs(config_file)
    parsed = _parse_overrides(list(overrides), where, dirs)
    try:
        cfg = _compose_raw(config_file, [o.text for o in parsed], dirs)
        _check_override_types(config_file, parsed, dirs, where)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error_line(e)) from e
    except RecursionError:
        raise ConfigError(f"{where}: the defaults lists include each other in a cycle (a config that lists itself, "
                          "directly or through another file)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: a config it includes is not UTF-8 text ({e.reason})") from None
    except (HydraException, OmegaConfBaseException, ValueError, KeyError) as e:
        raise _composition_error(e, where, parsed, config_file, dirs) from e
    _check_group_files(cfg.hydra.runtime.choices, dirs)
    with open_dict(cfg):
        del cfg["hydra"]
    _check_missing_and_interpolations(cfg, where)
    remember_source(cfg, config_file)
    return cfg
