"""Packaging: a built wheel carries the YAML configs and recipe files; every package folder is listed.

`configs/` and `recipes/` live at the top level and install as `mmtrain.configs` / `mmtrain.recipes` through
setuptools' package-dir mapping, with an explicit package list in pyproject.toml: a new sub-package folder that
is not listed would silently be missing from a non-editable install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _package_folders() -> dict[str, Path]:
    """Dotted package name -> folder, for every folder with __init__.py under mmtrain/, configs/, recipes/."""
    roots = {"mmtrain": REPO / "mmtrain", "mmtrain.configs": REPO / "configs", "mmtrain.recipes": REPO / "recipes"}
    found = {}
    for prefix, root in roots.items():
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            if "__pycache__" in parts:
                continue
            found[".".join((prefix, *parts))] = init.parent
    return found


def test_every_package_folder_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = sorted(set(_package_folders()) - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def _setuptools_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in version("setuptools").split(".")[:2] if p.isdigit())


@pytest.mark.slow
def test_wheel_contains_configs_and_recipes(tmp_path):
    required = next(r for r in _pyproject()["build-system"]["requires"] if r.startswith("setuptools"))
    minimum = tuple(int(p) for p in required.split(">=")[1].split("."))
    assert _setuptools_version() >= minimum, (
        f"the venv's setuptools is older than pyproject's build requirement ({required}): add "
        f"'{required}' and 'wheel' to the test extra")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("mmtrain", "configs", "recipes"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    out = tmp_path / "dist"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                             "-q", "-w", str(out)], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("mmtrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    yaml_files = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    recipe_files = sorted(p.name for p in (REPO / "recipes").glob("*.py"))
    assert "mmtrain/recipes/__init__.py" in names and "mmtrain/configs/__init__.py" in names
    assert not [f for f in yaml_files if f"mmtrain/configs/{f}" not in names]
    assert not [f for f in recipe_files if f"mmtrain/recipes/{f}" not in names]
    assert "mmtrain/cli/main.py" in names and "mmtrain/config/__init__.py" in names
    for package in _package_folders():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert not [n for n in names if n.split("/")[0] in ("configs", "recipes", "tests")]
