"""Checks on the keys every recipe reads the same way, shared by the recipes' ``validate(cfg, report)``.

``mmtrain run`` runs a recipe's ``validate`` before it starts, so these catch in one line what would otherwise be a
traceback mid-run (a deleted ``~optimizer``, ``seed=${output_dir}``) or a silent mistake (a negative
``clip_grad_norm`` turns clipping into gradient ascent).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

_MISSING = object()


def _value(cfg: DictConfig, key: str, report: Any) -> Any:
    """The resolved value at ``key`` (``_MISSING`` when absent); an interpolation that fails is reported."""
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_resolution_failure=True)
    except Exception as err:  # omegaconf's resolution errors: InterpolationResolutionError and friends
        report.error(key, f"cannot be resolved: {' '.join(str(err).split())}")
        return _MISSING
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_common_keys(cfg: DictConfig, report: Any, *, required: Iterable[str] = (),
                      components: Iterable[str] = (), optional_components: Iterable[str] = ()) -> None:
    """``required`` keys must be present, ``components`` must be built from a ``_target_`` and so must
    ``optional_components`` where given (not null); ``seed``, ``clip_grad_norm``, ``num_workers``, ``device``,
    ``resume``, ``dataset.path``, ``output_dir`` and ``eval.batch_size`` must make sense where given."""
    components, optional_components = tuple(components), tuple(optional_components)
    for key in (*components, *optional_components, *required):
        node = OmegaConf.select(cfg, key, default=_MISSING, throw_on_resolution_failure=False)
        if node is _MISSING or (node is None and key in optional_components):
            if key not in optional_components:
                report.error(key, "missing: this recipe needs it (was it removed with '~'?)")
        elif key not in required and not (isinstance(node, DictConfig) and "_target_" in node):
            report.error(key, "has no _target_ to build it from (was its config group removed with '~'?)")
    seed = _value(cfg, "seed", report)
    if seed is not _MISSING and seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**64:
            report.error("seed", f"must be an integer in [-2**63, 2**64), got {seed!r}")
    clip = _value(cfg, "clip_grad_norm", report)
    if clip is not _MISSING and clip is not None and (not _is_number(clip) or clip < 0):
        report.error("clip_grad_norm", f"must be a number >= 0 (0 or null: no clipping), got {clip!r}")
    workers = _value(cfg, "num_workers", report)
    if workers is not _MISSING and workers is not None and (
            not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        report.error("num_workers", f"must be an integer >= 0, got {workers!r}")
    eval_batch = _value(cfg, "eval.batch_size", report)
    if eval_batch is not _MISSING and eval_batch is not None and (
            not isinstance(eval_batch, int) or isinstance(eval_batch, bool) or eval_batch < 1):
        report.error("eval.batch_size", f"must be a positive integer, got {eval_batch!r}")
    device = _value(cfg, "device", report)
    if device is not _MISSING and device is not None and str(device) != "auto":
        _check_device(str(device), report)
    resume = _value(cfg, "resume", report)
    if resume is not _MISSING and resume not in (None, False) and str(resume).lower() not in (
            "auto", "none", "null", "false", ""):
        if not Path(str(resume)).expanduser().exists():
            report.error("resume", f"{resume}: no such checkpoint folder (auto, none, a checkpoint folder or a run's "
                         "output_dir)")
    data_path = _value(cfg, "dataset.path", report)
    if isinstance(data_path, str) and data_path and not Path(data_path).expanduser().exists():
        report.error("dataset.path", f"{data_path} does not exist")
    output_dir = _value(cfg, "output_dir", report)
    if output_dir is not _MISSING and (not isinstance(output_dir, str) or not output_dir.strip()):
        report.error("output_dir", f"must be a folder path, got {output_dir!r}")


def _check_device(device: str, report: Any) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        report.error("device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")
        return
    if parsed.type not in ("cpu", "cuda"):
        report.error("device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")
