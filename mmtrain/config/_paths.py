"""Where built-in recipes and configs live, and how a name or a path given by the user becomes a file.

`configs/` and `recipes/` sit at the top of the repository but install as the packages `mmtrain.configs` and
`mmtrain.recipes`, so their folders are found through those packages (editable or not).
"""

from __future__ import annotations

import ast
import difflib
import os
from pathlib import Path

from mmtrain.errors import ConfigError

YAML_SUFFIXES = (".yaml",)


# Tests point the built-in folders at a temporary tree: {"configs": Path, "recipes": Path}. Empty in real use.
BUILTIN_DIRS_OVERRIDE: dict[str, Path] = {}


def builtin_configs_dir() -> Path:
    """Folder of the built-in configs (the installed package ``mmtrain.configs``)."""
    if "configs" in BUILTIN_DIRS_OVERRIDE:
        return Path(BUILTIN_DIRS_OVERRIDE["configs"]).resolve()
    import mmtrain.configs

    return Path(mmtrain.configs.__file__).resolve().parent


def builtin_recipes_dir() -> Path:
    """Folder of the built-in recipes (the installed package ``mmtrain.recipes``)."""
    if "recipes" in BUILTIN_DIRS_OVERRIDE:
        return Path(BUILTIN_DIRS_OVERRIDE["recipes"]).resolve()
    import mmtrain.recipes

    return Path(mmtrain.recipes.__file__).resolve().parent


def display_path(path: Path | str) -> str:
    """A path as the user wants to read it: relative to the working folder when inside it."""
    path = Path(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if rel.startswith("..") else rel


def suggest(word: str, candidates, n: int = 3) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"


def looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith((".py", ".yaml", ".yml")) or text.startswith(".")


def builtin_recipe_names() -> list[str]:
    return sorted(p.stem for p in builtin_recipes_dir().glob("*.py") if not p.name.startswith("_"))


def recipe_name_of(recipe: str | os.PathLike) -> str:
    """``contrastive`` for ``contrastive`` or ``path/to/contrastive.py``: the name that selects ``configs/<name>/``."""
    text = os.fspath(recipe)
    return Path(text).stem if text.endswith(".py") or os.sep in text or "/" in text else text


def resolve_recipe(recipe: str | os.PathLike) -> Path:
    """A built-in recipe name or a path to a recipe ``.py`` file -> the recipe file.

    Raises ConfigError for a missing file or an unknown name (with the nearest names).
    """
    text = os.fspath(recipe)
    if text.endswith(".py") or os.sep in text or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"{text}: recipe file not found")
        return path.resolve()
    path = builtin_recipes_dir() / f"{text}.py"
    if path.is_file() and not text.startswith("_"):
        return path
    names = builtin_recipe_names()
    listing = ", ".join(names) if names else "none installed"
    raise ConfigError(f"unknown recipe '{text}'{suggest(text, names)}; built-in recipes: {listing}; "
                      "or give a path to a recipe .py file")


def recipe_description(path: Path) -> str:
    """First line of a recipe's module docstring, read with ``ast`` (the recipe is not imported)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return "(cannot read this recipe file)"
    doc = ast.get_docstring(tree)
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else "(no description)"


def yaml_names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def config_names_for(recipe_name: str) -> list[str]:
    """Built-in config names usable with this recipe: ``configs/<recipe>/*`` then ``configs/*``."""
    root = builtin_configs_dir()
    return yaml_names(root / recipe_name) + yaml_names(root)


def resolve_config(recipe: str | os.PathLike, config: str | os.PathLike) -> Path:
    """A config name (``configs/<recipe>/<name>.yaml``, then ``configs/<name>.yaml``) or a YAML path -> file.

    ``recipe`` is a built-in recipe name or a recipe file path (its stem names the built-in config folder).
    """
    recipe_name = recipe_name_of(recipe)
    recipe_is_file = recipe_name != os.fspath(recipe)
    text = os.fspath(config)
    if not text:
        raise ConfigError("no config given: pass --config NAME or --config path/to/config.yaml")
    if text.endswith((".yaml", ".yml")) or os.sep in text or text.startswith("."):
        path = Path(text).expanduser()
        if not path.exists():
            raise ConfigError(f"{text}: config file not found")
        if not path.is_file():
            raise ConfigError(f"{text}: not a file")
        if path.suffix != ".yaml":
            raise ConfigError(f"{text}: config files must end in .yaml (Hydra finds only .yaml)")
        return path.resolve()
    root = builtin_configs_dir()
    for candidate in (root / recipe_name / f"{text}.yaml", root / f"{text}.yaml"):
        if candidate.is_file():
            return candidate
    known_recipe = (builtin_recipes_dir() / f"{recipe_name}.py").is_file() or (root / recipe_name).is_dir()
    if recipe_is_file and not known_recipe:
        # A recipe copied with `mmtrain cp contrastive my_recipe.py` keeps using its original's configs by name,
        # as long as the name belongs to one built-in recipe only.
        owners = sorted(p.parent for p in root.glob(f"*/{text}.yaml") if p.parent.name in builtin_recipe_names())
        if len(owners) == 1:
            return owners[0] / f"{text}.yaml"
        also = f"; it is a config of {', '.join(p.name for p in owners)}: give its path" if owners else ""
        raise ConfigError(f"config '{text}' not found: recipe file '{os.fspath(recipe)}' has no built-in configs "
                          f"(configs/{recipe_name}/) and there is no configs/{text}.yaml{also}; give a path to a "
                          f".yaml file")
    if not known_recipe:
        names = builtin_recipe_names()
        raise ConfigError(f"unknown recipe '{recipe_name}'{suggest(recipe_name, names)}: no built-in configs "
                          f"for it, so config '{text}' must be a path to a .yaml file")
    names = config_names_for(recipe_name)
    listing = ", ".join(names) if names else "none"
    raise ConfigError(f"unknown config '{text}' for recipe '{recipe_name}'{suggest(text, names)}; "
                      f"available: {listing}; or give a path to a .yaml file")
