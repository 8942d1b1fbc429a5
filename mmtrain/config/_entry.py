"""Running a recipe file: import it by path, parse ``--config C [overrides]``, load, call ``main(cfg)``.

Used three ways: ``recipe_entry(main)`` at the bottom of a recipe (``python recipes/x.py --config C``), the
in-process ``mmtrain run``, and the per-rank worker that ``torch.distributed.run`` starts.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from mmtrain.config._compose import load
from mmtrain.config._state import one_line
from mmtrain.errors import ConfigError, UserError, print_error


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or ``MMTRAIN_DEBUG`` set to something other than '', '0', 'false', 'no' or 'off'."""
    return flag or os.environ.get("MMTRAIN_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def import_recipe(path: str | os.PathLike):
    """Import a recipe file as a module (named ``mmtrain_recipe_<stem>``) without touching sys.path."""
    path = Path(path).resolve()
    module_name = f"mmtrain_recipe_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot import as a recipe (not a Python file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pickling, dataclasses and multiprocessing need it registered
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    if not callable(getattr(module, "main", None)):
        raise ConfigError(f"{path}: a recipe must define main(cfg)")
    return module


def recipe_arg_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run this recipe with a config and overrides.")
    parser.add_argument("--config", required=True, help="built-in config name or path to a .yaml file")
    parser.add_argument("--allow-any-target", action="store_true",
                        help="trust _target_ paths outside mmtrain./torch./torchvision.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: a.b=1 +a.new=1 ~a.b group=option")
    return parser


def run_recipe_main(main, recipe_file: str | os.PathLike, argv: list[str], prog: str | None = None) -> int:
    """Parse ``argv``, load the config for ``recipe_file`` and call ``main(cfg)``; exit status (UserError -> 2)."""
    args = recipe_arg_parser(prog).parse_intermixed_args(argv)
    try:
        cfg = load(recipe_file, args.config, args.overrides, allow_any_target=args.allow_any_target)
        main(cfg)
    except UserError as e:
        if debug_requested(args.debug):
            raise
        print_error(one_line(e))
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of a launch: one quiet line from rank 0
        if debug_requested(args.debug):
            raise
        if os.environ.get("RANK", "0") == "0":
            print("interrupted", file=sys.stderr)
        return 130
    return 0


def recipe_entry(main) -> None:
    """Let a recipe file run as a script: ``python recipes/x.py --config C [--allow-any-target] [overrides]``.

    Put ``if __name__ == "__main__": recipe_entry(main)`` at the bottom of the recipe. Exits the process with 0,
    or 2 after printing one ``error: ...`` line for a UserError (a traceback only with --debug/MMTRAIN_DEBUG=1).
    """
    module = sys.modules.get(main.__module__)
    recipe_file = getattr(module, "__file__", None) or sys.argv[0]
    exit_with(lambda: run_recipe_main(main, recipe_file, sys.argv[1:], prog=Path(recipe_file).name))


def is_rank_process() -> bool:
    """True in a process that torch.distributed.run (or SLURM through it) started as one rank of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def exit_with(call: Callable[[], int | None], rank_process: bool | None = None) -> NoReturn:
    """End the process with ``call()``'s exit status, as ``sys.exit(call())`` would, but safely in a rank process.

    A rank's gloo worker threads can still be destroying a finished collective's work, whose tensors own Python
    objects, when the interpreter finalizes; the thread's GIL acquire then ends it from inside C++ and
    ``std::terminate`` aborts the rank ("terminate called without an active exception", exit -6; one run in five on
    a 2-core machine with torch 2.14, pytorch/pytorch#179291). So a rank runs the exit handlers, flushes, and leaves
    with ``os._exit``, skipping finalization. A bug still prints its traceback and exits 1.
    """
    if rank_process is None:
        rank_process = is_rank_process()
    if not rank_process:
        sys.exit(call())
    try:
        code = call()
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
