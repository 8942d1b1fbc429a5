"""``ValidationReport`` and ``validate_components``: build every component of a config on the meta device.

Nothing is allocated (``torch.device("meta")``); every problem is collected, not only the first. Components are
the outermost nodes with ``_target_`` (model, loss, tokenizer, dataset, ...); ``optimizer`` and ``lr_scheduler``
are ``_partial_`` factories, checked by calling ``optimizer(model.parameters())`` and ``lr_scheduler(optimizer)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from mmtrain.config._instantiate import KeyedConfigError, check_targets, instantiate
from mmtrain.config._paths import display_path
from mmtrain.config._state import one_line, source_of
from mmtrain.errors import UserError


@dataclass(frozen=True)
class ValidationIssue:
    key_path: str
    message: str

    def __str__(self) -> str:
        return f"key '{self.key_path}': {self.message}" if self.key_path else self.message


class ValidationReport:
    """What ``mmtrain validate`` found: ``errors`` (each a key path and a cause) and ``infos`` (plain lines).

    A recipe's optional ``validate(cfg, report)`` adds its own checks with ``report.error("key.path", "cause")``
    and notes with ``report.info("line")``.
    """

    def __init__(self, *, collect_infos: bool = True) -> None:
        self.errors: list[ValidationIssue] = []
        self.infos: list[str] = []
        # False where only errors matter (`mmtrain run`): a recipe may then skip work done only for its notes.
        self.collects_infos = collect_infos

    def error(self, key_path: str, message: str) -> None:
        self.errors.append(ValidationIssue(str(key_path or ""), one_line(message)))

    def info(self, message: str) -> None:
        self.infos.append(one_line(message))

    @property
    def ok(self) -> bool:
        return not self.errors

    def __repr__(self) -> str:
        return f"ValidationReport(errors={len(self.errors)}, infos={len(self.infos)})"


def _component_nodes(cfg: DictConfig, prefix: str = ""):
    """Outermost nodes with ``_target_`` as (key path, node), in config order."""
    if isinstance(cfg, DictConfig):
        if cfg._is_missing() or cfg._is_none():
            return
        if "_target_" in cfg:
            yield prefix, cfg
            return
        for k in cfg:
            child = cfg._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _component_nodes(child, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(cfg, ListConfig):
        for i in range(len(cfg)):
            child = cfg._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _component_nodes(child, f"{prefix}.{i}")


_BUILD_ORDER = {"model": 0, "optimizer": 1, "lr_scheduler": 2}


def _record(report: ValidationReport, key: str, error: Exception) -> None:
    if isinstance(error, KeyedConfigError):
        report.error(error.key_path, error.detail)
    else:
        report.error(key, one_line(error))


def validate_components(cfg: DictConfig, report: ValidationReport | None = None, recipe_validate=None,
                        *, debug: bool = False) -> ValidationReport:
    """Build every component of ``cfg`` on the meta device and run ``recipe_validate(cfg, report)``.

    Errors go to ``report.errors`` (with ``debug`` an unexpected exception propagates instead), notes such as
    the model's parameter count to ``report.infos``.
    """
    import torch

    report = ValidationReport() if report is None else report
    nodes = sorted(_component_nodes(cfg), key=lambda item: _BUILD_ORDER.get(item[0], 3))
    built: dict[str, object] = {}
    with torch.device("meta"):
        for key, node in nodes:
            target = node.get("_target_")
            args = (None,) if key in ("optimizer", "lr_scheduler") else ()
            optional_args = key not in ("optimizer", "lr_scheduler")
            errors, missing = check_targets(node, args=args, top_may_miss_arguments=optional_args)
            for error in errors:
                report.error(error.key_path, error.detail)
            if errors:
                continue
            if missing:
                report.info(f"{key}: {target}: not built here: needs {', '.join(repr(m) for m in missing)} "
                            "from the recipe")
                continue
            try:
                built[key] = _build(key, node, built, report)
            except UserError as e:
                _record(report, key, e)
            except Exception as e:  # validate reports everything it finds; --debug shows where
                if debug:
                    raise
                report.error(key, f"building {target} on the meta device failed: {type(e).__name__}: {one_line(e)}")
    if recipe_validate is not None:
        try:
            recipe_validate(cfg, report)
        except UserError as e:
            report.error("", one_line(e))
    return report


def _build(key: str, node: DictConfig, built: dict, report: ValidationReport):
    import torch

    target = node.get("_target_")
    if key == "optimizer":
        factory = instantiate(node)
        extra = {}
        if node.get("fused", False):
            extra["fused"] = False  # fused kernels do not exist for meta tensors
            report.info("optimizer: fused=True is checked on a real device only")
        model = built.get("model")
        # Without a (buildable) model, a stand-in parameter still checks the optimizer's own arguments.
        params = model.parameters() if isinstance(model, torch.nn.Module) else [torch.nn.Parameter(torch.empty(1))]
        return factory(params, **extra)
    if key == "lr_scheduler":
        optimizer = built.get("optimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.empty(1))], lr=0.1)  # stand-in, as above
        factory = instantiate(node)
        extra = {}
        # Recipes pass num_training_steps=max_steps (a key every training recipe honours) when the config does not.
        max_steps = OmegaConf.select(node._get_root(), "max_steps")
        if "num_training_steps" not in node and _accepts(factory, "num_training_steps"):
            if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
                return None  # nothing to check it with; the recipe's own check names max_steps
            extra["num_training_steps"] = max_steps
        return factory(optimizer, **extra)
    obj = instantiate(node)
    if key == "model" and isinstance(obj, torch.nn.Module):
        count = sum(p.numel() for p in obj.parameters())
        report.info(f"model: {target}: {count:,} parameters")
    return obj


def _accepts(factory, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(getattr(factory, "func", factory)).parameters
    except (TypeError, ValueError):
        return False


def describe_source(cfg) -> str:
    path = source_of(cfg)
    return display_path(path) if path is not None else "config"
