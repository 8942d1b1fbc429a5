"""The ``mmtrain`` command: ls, cp, print, validate, run, bench.

``mmtrain VERB --help`` describes each verb. A user mistake (any ``mmtrain.errors.UserError``) prints one line
``error: ...`` on stderr and exits with status 2; ``--debug`` (or ``MMTRAIN_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import pkgutil
import shutil
import sys
from pathlib import Path

from mmtrain.errors import ConfigError, UserError, print_error

VERBS = {
    "ls": "list recipes (with a one-line description) and their built-in configs",
    "cp": "copy a built-in config (or, given a recipe name, the recipe file) to edit",
    "print": "print the resolved config of RECIPE --config C [overrides]",
    "validate": "build every component on the meta device and report every problem (exit 0 or 2)",
    "run": "run a recipe in this process, or one process per rank through torch.distributed.run",
    "bench": "run a benchmark from mmtrain.bench (default: all)",
}

LAUNCHER_OPTIONS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "max_restarts")
_LAUNCHER_FLAGS = tuple("--" + name.replace("_", "-") for name in LAUNCHER_OPTIONS)

OVERRIDE_HELP = ("Hydra overrides: key=value, +new.key=value, ++key=value, ~key, group=option "
                 "(e.g. optimizer.lr=3e-4 model/attention=local)")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mmtrain")
    except Exception:  # noqa: BLE001  (running from a source tree that is not installed)
        return "unknown"


def _top_parser() -> argparse.ArgumentParser:
    verbs = "\n".join(f"  {name:<9} {text}" for name, text in VERBS.items())
    parser = argparse.ArgumentParser(
        prog="mmtrain",
        description="Config-driven training and fine-tuning of multimodal models.",
        epilog=f"verbs:\n{verbs}\n\nexamples:\n  mmtrain ls\n  mmtrain run contrastive --config align_tiny "
               "optimizer.lr=3e-4\n  mmtrain validate contrastive --config ./my.yaml\n\n"
               "`mmtrain VERB --help` describes a verb.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mmtrain {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("verb", choices=list(VERBS), metavar="VERB", help=", ".join(VERBS))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"mmtrain {verb}", description=VERBS[verb],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    if verb == "cp":
        parser.add_argument("name", help="config name (NAME or RECIPE/NAME, e.g. contrastive/align_tiny) or recipe "
                                         "name")
        parser.add_argument("dest", help="destination file or folder")
        parser.add_argument("--force", action="store_true", help="overwrite an existing destination file")
    elif verb in ("print", "validate", "run"):
        parser.add_argument("recipe", help="built-in recipe name or path to a recipe .py file")
        parser.add_argument("--config", required=True,
                            help="config name (configs/RECIPE/NAME.yaml, then configs/NAME.yaml) or path to a .yaml")
        parser.add_argument("--allow-any-target", action="store_true",
                            help="trust _target_ paths outside mmtrain., torch., torchvision. (runs their code)")
        parser.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
        if verb == "run":
            launch = parser.add_argument_group(
                "distributed launch (any of these hands over to torch.distributed.run, one process per rank)")
            launch.add_argument("--nproc-per-node", type=_nproc_per_node,
                                help="processes per node (a number, or gpu/cpu/auto)")
            launch.add_argument("--nnodes", type=_nnodes, help="number of nodes, or MIN:MAX for elastic runs")
            launch.add_argument("--node-rank", type=_count(0), help="rank of this node (multi-node, static rendezvous)")
            launch.add_argument("--rdzv-backend", choices=("c10d", "etcd", "etcd-v2", "static"),
                                help="rendezvous backend (c10d, etcd, static)")
            launch.add_argument("--rdzv-endpoint", type=_endpoint, help="rendezvous HOST:PORT")
            launch.add_argument("--max-restarts", type=_count(0), help="restarts of the worker group before failing")
        if verb == "print":
            parser.add_argument("--unresolved", action="store_true", help="keep ${...} interpolations as written")
    elif verb == "bench":
        names = _bench_names()
        parser.description = (f"{VERBS[verb]}\n\navailable: {', '.join(names) if names else 'none yet'}; "
                              "arguments after NAME go to the benchmark (`mmtrain bench NAME --help`)")
        parser.add_argument("name", nargs="?", default="all", help="benchmark module in mmtrain.bench (default: all)")
        parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _nproc_per_node(text: str) -> str:
    if text in ("gpu", "cpu", "auto"):
        if text == "gpu":
            import torch

            if not torch.cuda.is_available():
                raise argparse.ArgumentTypeError("gpu: no CUDA device here (use a number, cpu or auto)")
        return text
    return str(_count(1)(text))


def _nnodes(text: str) -> str:
    low, _, high = text.partition(":")
    low_value = _count(1)(low)
    if high and _count(1)(high) < low_value:
        raise argparse.ArgumentTypeError(f"MIN:MAX with MIN <= MAX, got {text!r}")
    return text


def _endpoint(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port in 1..65535, got {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmtrain`` console script; returns the exit status.

    Started as one rank of a torchrun/SLURM launch, the process ends here through ``exit_with`` (no interpreter
    finalization, see there) instead of returning.
    """
    from mmtrain.config._entry import exit_with, is_rank_process

    if argv is None and is_rank_process():
        exit_with(lambda: _main(sys.argv[1:]), rank_process=True)
    if argv is None and any(arg.split("=", 1)[0] in _LAUNCHER_FLAGS for arg in sys.argv[1:]):
        # The launcher's torchrun threads can abort interpreter finalization after Ctrl-C the same way a rank's
        # gloo threads do ("terminate called without an active exception"): leave as a rank does.
        exit_with(lambda: _main(sys.argv[1:]), rank_process=True)
    return _main(list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    top = _top_parser().parse_args(argv)
    parser = _verb_parser(top.verb)
    if top.verb == "bench":
        args = parser.parse_args(top.rest)
    else:
        args = parser.parse_intermixed_args(top.rest)
    from mmtrain.config._entry import debug_requested

    debug = debug_requested(top.debug or args.debug)
    try:
        return _VERB_FUNCTIONS[top.verb](args, debug)
    except UserError as e:
        if debug:
            raise
        from mmtrain.config._state import one_line

        print_error(one_line(e))
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mmtrain ls | head -1`: the reader left; end quietly as other Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# ---------------------------------------------------------------------------------------------------- ls, cp


def _ls(args, debug: bool) -> int:
    from mmtrain.config import builtin_configs_dir, builtin_recipes_dir, recipe_description
    from mmtrain.config._paths import yaml_names

    configs = builtin_configs_dir()
    recipes = sorted(p for p in builtin_recipes_dir().glob("*.py") if not p.name.startswith("_"))
    print("recipes:")
    if not recipes:
        print("  (none installed)")
    width = max((len(p.stem) for p in recipes), default=0)
    for path in recipes:
        print(f"  {path.stem:<{width}}  {recipe_description(path)}")
        names = yaml_names(configs / path.stem)
        print(f"  {'':<{width}}  configs: {', '.join(names) if names else '(none)'}")
    recipe_names = {p.stem for p in recipes}
    groups = []
    for folder in sorted(p for p in configs.rglob("*") if p.is_dir() and not p.name.startswith(("_", "."))):
        group = folder.relative_to(configs).as_posix()
        if group.split("/")[0] in recipe_names:
            continue
        names = yaml_names(folder)
        if names:
            groups.append((group, names))
    shared = yaml_names(configs)
    if groups or shared:
        print("config groups (override with GROUP=OPTION, e.g. model/attention=local):")
        for group, names in groups:
            print(f"  {group}: {', '.join(names)}")
        if shared:
            print(f"shared configs: {', '.join(shared)}")
    return 0


def _find_copy_source(name: str) -> Path:
    from mmtrain.config import builtin_configs_dir, builtin_recipes_dir
    from mmtrain.config._paths import suggest

    configs, recipes = builtin_configs_dir(), builtin_recipes_dir()
    stem = name.removesuffix(".yaml")
    if "/" in stem:
        path = configs / f"{stem}.yaml"
        if path.is_file():
            return path
        known = [p.relative_to(configs).with_suffix("").as_posix() for p in configs.rglob("*.yaml")]
        raise ConfigError(f"no built-in config '{stem}'{suggest(stem, known)}; see `mmtrain ls`")
    candidates = []
    recipe_file = recipes / f"{stem}.py"
    if recipe_file.is_file() and not stem.startswith("_"):
        candidates.append(recipe_file)
    candidates += sorted(p for p in configs.glob(f"*/{stem}.yaml"))
    if (configs / f"{stem}.yaml").is_file():
        candidates.append(configs / f"{stem}.yaml")
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        shown = ", ".join(p.relative_to(recipes).as_posix() + " (recipe)" if p.suffix == ".py"
                          else p.relative_to(configs).with_suffix("").as_posix() for p in candidates)
        raise ConfigError(f"'{name}' is ambiguous: {shown}; name one as RECIPE/NAME (or GROUP/NAME)")
    known = [p.stem for p in recipes.glob("*.py") if not p.name.startswith("_")]
    known += [p.stem for p in configs.rglob("*.yaml")]
    raise ConfigError(f"no built-in config or recipe named '{name}'{suggest(stem, known)}; see `mmtrain ls`")


def _cp(args, debug: bool) -> int:
    source = _find_copy_source(args.name)
    dest = Path(args.dest).expanduser()
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest}: already exists; pass --force to overwrite")
    if not dest.parent.is_dir():
        raise ConfigError(f"{dest.parent}: destination folder does not exist")
    shutil.copyfile(source, dest)
    kind = "recipe" if source.suffix == ".py" else "config"
    print(f"copied {kind} {source.name} to {dest}")
    if kind == "config":
        print(f"use it with: mmtrain run RECIPE --config {dest}")
    else:
        print(f"run it with: mmtrain run {dest} --config CONFIG")
    return 0


# ---------------------------------------------------------------------------------------- print, validate, run


def _load_for(args):
    from mmtrain.config import load, resolve_recipe

    recipe_file = resolve_recipe(args.recipe)
    cfg = load(recipe_file, args.config, args.overrides, allow_any_target=args.allow_any_target)
    return recipe_file, cfg


def _print(args, debug: bool) -> int:
    from omegaconf import OmegaConf

    _, cfg = _load_for(args)
    sys.stdout.write(OmegaConf.to_yaml(cfg, resolve=not args.unresolved))
    return 0


def _validate(args, debug: bool) -> int:
    from mmtrain.config import import_recipe, resolve_recipe, validate_components
    from mmtrain.config._paths import display_path
    from mmtrain.config._state import source_of

    recipe_file = resolve_recipe(args.recipe)
    _, cfg = _load_for(args)
    module = import_recipe(recipe_file)
    report = validate_components(cfg, recipe_validate=getattr(module, "validate", None), debug=debug)
    where = display_path(source_of(cfg))
    for line in report.infos:
        print(line)
    for issue in report.errors:
        print_error(f"{where}: {issue}")
    if report.errors:
        print(f"{where}: {len(report.errors)} problem(s) found", file=sys.stderr)
        return 2
    print(f"{where}: ok")
    return 0


def _run(args, debug: bool) -> int:
    from omegaconf import OmegaConf

    from mmtrain.cli._output_lock import output_dir_lock
    from mmtrain.config import import_recipe, resolve_recipe

    launcher = {name: getattr(args, name) for name in LAUNCHER_OPTIONS if getattr(args, name) is not None}
    if launcher:
        return _launch_distributed(args, launcher, debug)
    recipe_file = resolve_recipe(args.recipe)
    _, cfg = _load_for(args)
    module = import_recipe(recipe_file)
    if not _recipe_checks_pass(module, cfg):
        return 2
    with output_dir_lock(OmegaConf.select(cfg, "output_dir", throw_on_resolution_failure=False)):
        module.main(cfg)
    return 0


def _recipe_checks_pass(module, cfg) -> bool:
    """The recipe's own ``validate`` checks (what ``mmtrain validate`` adds to building every component) run
    before ``run`` starts, so a bad value is one line per problem here instead of a traceback mid-run."""
    from mmtrain.config import ValidationReport
    from mmtrain.config._paths import display_path
    from mmtrain.config._state import source_of

    recipe_validate = getattr(module, "validate", None)
    if recipe_validate is None:
        return True
    report = ValidationReport(collect_infos=False)
    try:
        recipe_validate(cfg, report)
    except UserError as e:
        report.error("", str(e))
    where = display_path(source_of(cfg))
    for issue in report.errors:
        print_error(f"{where}: {issue}")
    return not report.errors


def _launch_distributed(args, launcher: dict, debug: bool) -> int:
    """Hand over to torch.distributed.run (the real launcher): one ``mmtrain.cli.worker`` process per rank."""
    from omegaconf import OmegaConf

    from mmtrain.cli._output_lock import output_dir_lock
    from mmtrain.config import import_recipe, load, resolve_recipe

    recipe_file = resolve_recipe(args.recipe)
    # Compose and check once here so a config mistake is one line from this process, not one per rank.
    cfg = load(recipe_file, args.config, args.overrides, allow_any_target=args.allow_any_target)
    if not _recipe_checks_pass(import_recipe(recipe_file), cfg):
        return 2
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launch_args = []
    for name, value in launcher.items():
        launch_args += [f"--{name.replace('_', '-')}", str(value)]
    single_node = str(launcher.get("nnodes", "1")) in ("1", "1:1")
    if single_node and "rdzv_endpoint" not in launcher and "rdzv_backend" not in launcher:
        launch_args.append("--standalone")  # a free local port: runs side by side do not collide on 29500
    worker_args = [str(recipe_file), "--config", str(args.config)]
    if args.allow_any_target:
        worker_args.append("--allow-any-target")
    if debug:
        worker_args.append("--debug")
    parsed = torchrun.parse_args(launch_args + ["--module", "mmtrain.cli.worker"] + worker_args + list(args.overrides))
    if not debug:
        # Workers print their own errors (one line for a user mistake, a traceback for a bug); the launcher's
        # warnings and multi-line failure reports stay out of the way unless --debug.
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        with output_dir_lock(OmegaConf.select(cfg, "output_dir", throw_on_resolution_failure=False)):
            torchrun.run(parsed)
    except SignalException as e:  # Ctrl-C or a kill: the workers were stopped; say so once
        if debug:
            raise
        print(f"interrupted ({e.sigval.name})", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in sorted(e.failures.items())}
        if 2 in codes.values():
            return 2  # a user mistake, already reported by the rank(s) that hit it
        failed = ", ".join(f"rank {rank} exit status {code}" for rank, code in codes.items())
        print_error(f"distributed run failed: {failed}")
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------- bench


def _bench_names() -> list[str]:
    import mmtrain.bench

    return sorted(m.name for m in pkgutil.iter_modules(mmtrain.bench.__path__) if not m.name.startswith("_"))


def _bench(args, debug: bool) -> int:
    import importlib

    from mmtrain.config._paths import suggest

    names = _bench_names()
    if args.name == "all" and "all" not in names:
        if not names:
            print("no benchmarks installed in mmtrain.bench", file=sys.stderr)
            return 0
        status = 0
        for name in names:
            status = max(status, int(importlib.import_module(f"mmtrain.bench.{name}").main(list(args.args)) or 0))
        return status
    if args.name not in names:
        raise UserError(f"unknown benchmark '{args.name}'{suggest(args.name, names)}; available: "
                        f"{', '.join(names) if names else 'none yet'}")
    module = importlib.import_module(f"mmtrain.bench.{args.name}")
    return int(module.main(list(args.args)) or 0)


_VERB_FUNCTIONS = {"ls": _ls, "cp": _cp, "print": _print, "validate": _validate, "run": _run, "bench": _bench}


if __name__ == "__main__":
    from mmtrain.config._entry import exit_with

    exit_with(main)
