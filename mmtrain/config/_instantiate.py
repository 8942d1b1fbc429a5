"""``instantiate``: build objects from ``_target_`` nodes (hydra.utils.instantiate underneath), safely.

Before anything is called, every ``_target_`` in the node (nested ones too) is checked: it must be under the
allowlist (``mmtrain.``, ``torch.``, ``torchvision.``) unless the user trusts the config (``--allow-any-target``),
it must import, and the config's keys must bind to the callable's signature. Each problem becomes a one-line
ConfigError naming the YAML file, the key path and the builder's signature.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import re

from omegaconf import DictConfig, ListConfig, OmegaConf

from mmtrain.config._paths import display_path, suggest
from mmtrain.config._state import allow_any_target as _allow_any_target_setting
from mmtrain.config._state import one_line, source_of
from mmtrain.errors import ConfigError, UserError

ALLOWED_TARGET_PREFIXES = ("mmtrain.", "torch.", "torchvision.")
# Under the allowed prefixes but able to run code from elsewhere (download-and-exec, unpickling, native libs).
DENIED_TARGETS = ("torch.hub.", "torch.load", "torch.jit.load", "torch.package.", "torch.utils.cpp_extension.",
                  "torch.ops.load_library", "torch.classes.load_library")
# What a builder raises for arguments it cannot use (bad values, impossible shapes): reported as ConfigError.
# Anything else escaping a builder is a bug and keeps its traceback.
BUILDER_ERRORS = (TypeError, ValueError, RuntimeError)
_RESERVED_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}


class KeyedConfigError(ConfigError):
    """A ConfigError that also carries the key path and the bare cause (for collecting validation reports)."""

    def __init__(self, where: str | None, key_path: str, detail: str):
        self.where, self.key_path, self.detail = where, key_path, detail
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}key '{key_path}': {detail}" if key_path else f"{prefix}{detail}")


def _where(node) -> str | None:
    path = source_of(node)
    return display_path(path) if path is not None else None


def _full_key(node, key: str | int | None = None) -> str:
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return node._get_full_key(key)
        except (AttributeError, KeyError, TypeError):  # a detached node: fall back to the local key
            return "" if key is None else str(key)
    return "" if key is None else str(key)


def is_target_allowed(target: str) -> bool:
    if any(target == d.rstrip(".") or target.startswith(d) for d in DENIED_TARGETS):
        return False
    return target.startswith(ALLOWED_TARGET_PREFIXES)


def locate(path: str):
    """Import ``a.b.c`` as module ``a.b`` attribute ``c`` (longest importable module prefix).

    Raises LookupError with a one-line reason; an import error inside an existing module propagates.
    """
    parts = path.split(".")
    if not path or any(not p.isidentifier() for p in parts):
        raise LookupError(f"'{path}' is not a dotted Python path")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue  # this prefix is not a module; try a shorter one
            raise
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                names = [n for n in dir(obj) if not n.startswith("_")]
                raise LookupError(f"'{getattr(obj, '__name__', module_name)}' has no attribute '{attr}'"
                                  f"{suggest(attr, names)}")
            obj = getattr(obj, attr)
        return obj
    raise LookupError(f"no module named '{parts[0]}'")


def _call_failed(fn, error: BaseException) -> str:
    """``calling NAME failed: Error: cause; signature: NAME(a, b=1)`` (the defaults shown are the signature's, not the
    values the config passed)."""
    if isinstance(fn, str):
        return f"calling {fn} failed: {type(error).__name__}: {one_line(error)}"
    return (f"calling {_qualified_name(fn)} failed: {type(error).__name__}: {one_line(error)}; "
            f"signature: {_signature_text(fn)}")


def _qualified_name(fn) -> str:
    return getattr(fn, "__module__", "") + "." + getattr(fn, "__qualname__", str(fn))


def _signature_text(fn) -> str:
    """``Name(a, b=1, *, c=None)``: the builder's signature without annotations, to fit on one line."""
    name = _qualified_name(fn)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return name
    parts, star_done = [], False
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star_done = True
            continue
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"{name}({', '.join(parts)})"


def _target_string(node: DictConfig):
    raw = node._get_node("_target_")
    return raw._value() if raw is not None and not raw._is_interpolation() else node.get("_target_")


def check_targets(node, *, args=(), kwargs=None, allow_any: bool | None = None,
                  top_may_miss_arguments: bool = False) -> tuple[list[KeyedConfigError], list[str]]:
    """Every problem with the ``_target_`` nodes in ``node``, without calling anything.

    ``args``/``kwargs`` are what the caller will pass to the top node. With ``top_may_miss_arguments`` the top
    node's missing required arguments are returned (second item) instead of reported as errors.
    Returns (errors, missing argument names of the top node).
    """
    allow_any = _allow_any_target_setting() if allow_any is None else allow_any
    where = _where(node)
    errors: list[KeyedConfigError] = []
    missing_top: list[str] = []

    def visit(current, is_top: bool, key: str) -> None:
        if isinstance(current, ListConfig):
            for i in range(len(current)):
                child = current._get_node(i)
                if isinstance(child, (DictConfig, ListConfig)):
                    visit(child, False, f"{key}.{i}" if key else str(i))
            return
        if not isinstance(current, DictConfig) or current._is_missing() or current._is_none():
            return
        if "_target_" not in current:
            for k in current:
                child = current._get_node(k)
                if isinstance(child, (DictConfig, ListConfig)):
                    visit(child, False, f"{key}.{k}" if key else str(k))
            return
        target = _target_string(current)
        if isinstance(target, str):
            if not allow_any and not is_target_allowed(target):
                errors.append(KeyedConfigError(
                    where, f"{key}._target_" if key else "_target_",
                    f"'{target}' is not allowed: targets must be under {', '.join(ALLOWED_TARGET_PREFIXES)}"
                    f"{' (and not ' + target + ')' if target.startswith(ALLOWED_TARGET_PREFIXES) else ''}; "
                    "pass --allow-any-target (or allow_any_target=True) to trust this config"))
                return
            try:
                fn = locate(target)
            except (LookupError, ImportError) as e:
                errors.append(KeyedConfigError(where, f"{key}._target_" if key else "_target_",
                                               f"cannot import '{target}': {one_line(e)}"))
                return
        else:
            fn = target
        if not callable(fn):
            errors.append(KeyedConfigError(where, key, f"_target_ '{target}' is not callable"))
            return
        _check_binding(current, fn, key, where, is_top, errors, missing_top)
        if current.get("_recursive_", True):
            for k in current:
                if k in ("_target_",):
                    continue
                child = current._get_node(k)
                if isinstance(child, (DictConfig, ListConfig)):
                    visit(child, False, f"{key}.{k}" if key else str(k))

    def _check_binding(current, fn, key, where, is_top, errors, missing_top) -> None:
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            return  # builtins without a signature: the call itself will tell
        call_kwargs = {k: None for k in current if k not in _RESERVED_KEYS}
        positional = list(current.get("_args_", None) or [])
        if is_top:
            call_kwargs.update(dict.fromkeys(kwargs or {}))
            if args:
                positional = list(args)
        partial = bool(current.get("_partial_", False))
        try:
            signature.bind_partial(*positional, **call_kwargs)
        except TypeError as e:
            detail = str(e)
            bad = re.search(r"unexpected keyword argument '([^']+)'", detail)
            hint = suggest(bad.group(1), signature.parameters) if bad else ""
            bad_key = f"{key}.{bad.group(1)}" if bad and key else (bad.group(1) if bad else key)
            errors.append(KeyedConfigError(where, bad_key, f"{detail}{hint}; signature: {_signature_text(fn)}"))
            return
        if partial:
            return
        try:
            signature.bind(*positional, **call_kwargs)
        except TypeError as e:
            unfilled = [n for n, p in signature.parameters.items()
                        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                        and n not in call_kwargs]
            names = unfilled[len(positional):]
            if is_top and top_may_miss_arguments:
                missing_top.extend(names or [str(e)])
                return
            errors.append(KeyedConfigError(where, key, f"{e}; signature: {_signature_text(fn)}"))

    if isinstance(node, (DictConfig, ListConfig)):
        visit(node, True, _full_key(node))
    return errors, missing_top


class ConfiguredPartial(functools.partial):
    """A ``_partial_: true`` factory whose call failures (bad argument values) say which config key built it."""

    def __call__(self, /, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except UserError:
            raise
        except BUILDER_ERRORS as e:
            raise KeyedConfigError(self.config_where, self.config_key, _call_failed(self.func, e)) from e


def _as_config(node):
    if isinstance(node, (dict, list, tuple)):
        return OmegaConf.create(list(node) if isinstance(node, tuple) else node, flags={"allow_objects": True})
    return node


def instantiate(node, *args, allow_any_target: bool | None = None, **kwargs):
    """Build the object described by ``node`` (a DictConfig or dict with ``_target_``; None gives None).

    Same semantics as ``hydra.utils.instantiate`` (``_partial_``, ``_args_``, nested targets, extra ``*args`` and
    ``**kwargs`` for the top node), plus: targets must be allowed (see ALLOWED_TARGET_PREFIXES) unless
    ``allow_any_target`` (default: the setting ``load(..., allow_any_target=...)`` made), and every failure to
    import, bind or call a target with the config's arguments is a one-line ConfigError naming the YAML file,
    the key path and the builder's signature. A ``_partial_`` result raises the same kind of error when called.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    if node is None:
        return None
    node = _as_config(node)
    errors, _ = check_targets(node, args=args, kwargs=kwargs, allow_any=allow_any_target)
    if errors:
        raise errors[0]
    where = _where(node)
    try:
        result = hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        found = re.search(r"full_key: (\S+)", str(e))
        key = found.group(1) if found else _full_key(node)
        target = re.search(r"target '([^']+)'", str(e))
        if isinstance(cause, UserError):
            raise cause  # noqa: B904
        if isinstance(cause, BUILDER_ERRORS):
            fn = target.group(1) if target else "the target"
            with contextlib.suppress(LookupError, ImportError):
                fn = locate(fn)
            raise KeyedConfigError(where, key, _call_failed(fn, cause)) from cause
        if cause is not None:
            raise cause  # noqa: B904
        raise KeyedConfigError(where, key, one_line(e)) from e
    if isinstance(result, functools.partial) and isinstance(node, DictConfig) and node.get("_partial_", False):
        wrapped = ConfiguredPartial(result.func, *result.args, **result.keywords)
        wrapped.config_where, wrapped.config_key = where, _full_key(node)
        return wrapped
    return result


__all__ = [
    "ALLOWED_TARGET_PREFIXES",
    "ConfiguredPartial",
    "KeyedConfigError",
    "check_targets",
    "instantiate",
    "is_target_allowed",
    "locate",
]
