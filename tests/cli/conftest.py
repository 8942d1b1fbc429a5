"""Fixtures for the config and CLI tests: a toy recipe and config tree copied to a temporary folder.

tests/cli/fixtures/: toy_recipe.py (fits a torch.nn.Linear), configs/toy.yaml (absolute default ``/model:
toy_linear``), configs/model/{toy_linear,toy_attn}.yaml, configs/model/attention/{plain,local}.yaml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def toy(tmp_path):
    """A writable copy of the fixtures: .recipe, .config (toy.yaml), .configs (its folder), .out (output_dir)."""
    root = tmp_path / "toy"
    shutil.copytree(FIXTURES, root, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    return SimpleNamespace(root=root, recipe=root / "toy_recipe.py", configs=root / "configs",
                           config=root / "configs" / "toy.yaml", out=out, out_override=f"output_dir={out}")


@pytest.fixture
def builtin_tree(tmp_path, monkeypatch):
    """Point the built-in recipes/configs folders at a temporary tree holding the toy recipe as 'toy'.

    configs/toy/toy.yaml (the recipe's built-in config), configs/model/..., recipes/toy.py.
    """
    from mmtrain.config import _paths

    root = tmp_path / "builtin"
    configs, recipes = root / "configs", root / "recipes"
    shutil.copytree(FIXTURES / "configs", configs, ignore=shutil.ignore_patterns("__pycache__"))
    (configs / "toy").mkdir()
    shutil.move(configs / "toy.yaml", configs / "toy" / "toy.yaml")
    recipes.mkdir()
    shutil.copy(FIXTURES / "toy_recipe.py", recipes / "toy.py")
    monkeypatch.setitem(_paths.BUILTIN_DIRS_OVERRIDE, "configs", configs)
    monkeypatch.setitem(_paths.BUILTIN_DIRS_OVERRIDE, "recipes", recipes)
    return SimpleNamespace(root=root, configs=configs, recipes=recipes)


def run_cli(*args, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """``python -m mmtrain.cli.main ARGS`` in a fresh process."""
    full_env = {k: v for k, v in os.environ.items() if k != "MMTRAIN_DEBUG"}
    full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "mmtrain.cli.main", *map(str, args)], check=False,
                          capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
