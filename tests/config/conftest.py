"""The config tests share the CLI tests' toy fixtures (tests/cli/conftest.py), loaded by path."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_mmtrain_cli_test_fixtures",
                                               Path(__file__).parents[1] / "cli" / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

FIXTURES = _fixtures.FIXTURES
toy = _fixtures.toy
builtin_tree = _fixtures.builtin_tree
