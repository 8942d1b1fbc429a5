"""Per-rank worker that ``mmtrain run --nproc-per-node N`` starts through torch.distributed.run.

``python -m mmtrain.cli.worker RECIPE_PATH --config C [--allow-any-target] [--debug] [overrides]``: imports the
recipe file, composes the config, calls ``main(cfg)``. A UserError prints one line and exits with status 2.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from mmtrain.config import import_recipe, resolve_recipe, run_recipe_main
    from mmtrain.config._entry import debug_requested
    from mmtrain.config._state import one_line
    from mmtrain.errors import UserError, print_error

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m mmtrain.cli.worker RECIPE_PATH --config C [overrides...]", file=sys.stderr)
        return 2
    try:
        recipe_file = resolve_recipe(argv[0])
        module = import_recipe(recipe_file)
    except UserError as e:
        if debug_requested("--debug" in argv):
            raise
        print_error(one_line(e))
        return 2
    return run_recipe_main(module.main, recipe_file, argv[1:], prog="mmtrain worker")


if __name__ == "__main__":
    from mmtrain.config._entry import exit_with

    exit_with(main, rank_process=True)
