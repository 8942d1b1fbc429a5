"""Training-state checkpoints over torch.distributed.checkpoint (DCP), and the final safetensors export.

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/           one complete checkpoint
        __0_0.distcp ...     DCP shard files (one per rank that wrote data)
        .metadata            DCP index
        COMPLETE.json        completion marker: step, world size, size + sha256 of every other file
    .tmp_step_00000200/      a write in progress: never loaded, removed by the next save

What one checkpoint holds (all of it tensors, so loading never unpickles code):

- ``model``: ``get_model_state_dict(module)`` (plain, DDP, compiled or FSDP2 modules alike; DCP reshards
  on load, so a run may resume on a different world size). When the recipe wraps model + loss in one
  module, the loss state (SigLIP's bias, a learnable temperature) is part of it.
- ``optim``: ``get_optimizer_state_dict(module, optimizer)`` (parameter names, not ids).
- ``scheduler``: the numeric entries of ``scheduler.state_dict()``.
- ``train``: the recipe's own counters (``step``, data position, skipped-step counts ...), ints or floats.
- ``rng.rank<r>``: torch CPU / CUDA / python / numpy generator states of every rank.

Writes go to a temporary folder, are fsync'd, get the marker, and are renamed; a failed write (disk full)
removes the temporary folder, keeps the previous checkpoint and says so. ``MMTRAIN_FAULT_AFTER_TMP_WRITE=N``
(tests) kills the process after the temporary folder of step N is written, before marker and rename. ``latest_complete()`` verifies
markers and checksums and skips (and reports) truncated or corrupted checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmtrain.errors import CheckpointError

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_step_"


# --------------------------------------------------------------------------------------------- dist helpers
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _world_size() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _broadcast_ddp_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics) before a DDP checkpoint, as DDP does before each
    forward: each rank updated its own copy in the last one, and the checkpoint keeps one rank's copy of a
    replicated tensor, not necessarily rank 0's, which the export and the next step use."""
    from torch.nn.parallel import DistributedDataParallel

    if not _dist_on() or not isinstance(model, DistributedDataParallel) or not model.broadcast_buffers:
        return
    for buffer in model.module.buffers():
        dist.broadcast(buffer.data, src=0)


def _all_ranks_ok(ok: bool) -> bool:
    """True only when ``ok`` holds on every rank (so all ranks take the same branch after a failure)."""
    if not _dist_on():
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor(1 if ok else 0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# ------------------------------------------------------------------------------------------ safe reading
class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` index is a pickle; only DCP's own metadata classes and torch sizes/dtypes load."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint"):
            obj = super().find_class(module, name)
            if isinstance(obj, type) or name == "_get_layout":
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif module == "torch.serialization" and name == "_get_layout" or module in ("pathlib", "pathlib._local") and name.endswith("Path") or (module, name) in {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata load refuses anything but DCP metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable or unsafe checkpoint index ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) load with ``weights_only=True``: no code runs."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# ------------------------------------------------------------------------------------------ RNG states
def capture_rng_state() -> dict[str, torch.Tensor]:
    """This process's generator states as tensors (python/numpy states encoded as int64/float64)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([py_version, *py_internal], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if py_gauss is None else py_gauss], dtype=torch.float64),
        "numpy": torch.tensor([int(np_pos), int(np_has_gauss), *np_keys.tolist()], dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(np_gauss)], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    py = state["python"].tolist()
    gauss = state["python_gauss"].item()
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), None if gauss != gauss else gauss))
    npv = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(npv[2:], dtype=np.uint32), npv[0], npv[1],
                         state["numpy_gauss"].item()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu())


# ------------------------------------------------------------------------------------------ small states
def _numeric_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Numbers and lists of numbers of a ``state_dict()`` as tensors; the rest (callables, None) is dropped."""
    out = {}
    for key, value in state.items():
        if isinstance(value, bool):
            out[key] = torch.tensor(value)
        elif isinstance(value, int):
            out[key] = torch.tensor(value, dtype=torch.int64)
        elif isinstance(value, float):
            out[key] = torch.tensor(value, dtype=torch.float64)
        elif isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            dtype = torch.int64 if all(isinstance(v, int) for v in value) else torch.float64
            out[key] = torch.tensor(list(value), dtype=dtype)
    return out


def _restore_numeric_state(template: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state = dict(template)
    for key, tensor in tensors.items():
        old = template.get(key)
        if isinstance(old, bool):
            state[key] = bool(tensor.item())
        elif isinstance(old, (int, float)):
            state[key] = type(old)(tensor.item())
        elif isinstance(old, (list, tuple)):
            values = [type(o)(v) for o, v in zip(old, tensor.tolist())] if len(old) == tensor.numel() else (
                tensor.tolist())
            state[key] = type(old)(values)
        else:
            state[key] = tensor.item() if tensor.numel() == 1 else tensor.tolist()
    return state


def _to_python(value: torch.Tensor) -> int | float | list:
    if value.numel() == 1:
        item = value.item()
        return item
    return value.tolist()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _int_after(prefix: str, text: str) -> int | None:
    """The integer that follows ``prefix`` in ``text`` (a checkpoint folder's name, an export's first line)."""
    if not text.startswith(prefix):
        return None
    try:
        return int(text[len(prefix):])
    except ValueError:
        return None


def _step_of(path: Path) -> int | None:
    return _int_after(STEP_PREFIX, path.name)


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete, intact checkpoint, or None when it is."""
    path = Path(path)
    marker = path / MARKER
    if not path.is_dir():
        return "not a folder"
    if not marker.is_file():
        return f"no {MARKER} (the write did not finish)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} ({e})"
    if ".metadata" not in files:
        return f"{MARKER} lists no .metadata"
    for name, expected in files.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MARKER} names a file outside the checkpoint: {name}"
        if not file.is_file():
            return f"missing file {name}"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size} bytes, expected {expected['size']} (truncated)"
        if _sha256(file) != expected["sha256"]:
            return f"{name} checksum mismatch (corrupted)"
    return None


# ------------------------------------------------------------------------------------------ fault hook
FAULT_ENV = "MMTRAIN_FAULT_AFTER_TMP_WRITE"


def _maybe_die_after_tmp_write(step: int) -> None:
    """Test hook: with ``MMTRAIN_FAULT_AFTER_TMP_WRITE=N`` (a step, or ``any``) the process dies like ``kill -9``
    (``os._exit(137)``: no cleanup) once the checkpoint of step N is in its temporary folder, before the marker
    and the rename. Without the variable it does nothing."""
    value = os.environ.get(FAULT_ENV, "").strip()
    if value and (value == "any" or (value.isdigit() and int(value) == step)):
        os._exit(137)


# ------------------------------------------------------------------------------------------ manager
class CheckpointManager:
    """Saves, finds, verifies and loads training-state checkpoints under ``<output_dir>/checkpoints``.

    Works with and without a process group; every method that touches DCP is collective (call it on all ranks).

    Args:
        output_dir: the run folder; checkpoints go to ``output_dir/checkpoints``.
        keep: how many complete checkpoints to keep (oldest removed after a successful save); None keeps all.
        log_fn: where messages go (the recipe passes its logger's ``info``); rank 0 only.
    """

    def __init__(self, output_dir: str | os.PathLike, keep: int | None = 2,
                 log_fn: Callable[[str], None] | None = None) -> None:
        self.dir = Path(output_dir) / "checkpoints"
        self.keep = keep
        self._log = log_fn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._found_by_auto: Path | None = None  # what resume=auto picked, so a misfit can say how to start afresh

    def _say(self, msg: str) -> None:
        if _rank() == 0:
            self._log(msg)

    # ------------------------------------------------------------------ discovery
    def checkpoints(self) -> list[Path]:
        """All ``step_*`` folders, newest first (complete or not)."""
        if not self.dir.is_dir():
            return []
        found = [(s, p) for p in self.dir.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
        return [p for _, p in sorted(found, reverse=True)]

    def latest_complete(self, directory: Path | None = None) -> Path | None:
        """Newest checkpoint whose marker and checksums verify; broken ones are reported and skipped."""
        manager_dir = self.dir
        if directory is not None:
            self.dir = Path(directory)
        try:
            for path in self.checkpoints():
                problem = verify_checkpoint(path)
                if problem is None:
                    return path
                self._say(f"checkpoint {path} is incomplete or corrupted ({problem}); trying the previous one")
            return None
        finally:
            self.dir = manager_dir

    def resolve_resume(self, resume: str | os.PathLike | None) -> Path | None:
        """``auto``: newest complete checkpoint here (None if there is none); ``none``/None: None; else a path.

        A given path may be one checkpoint folder or a ``checkpoints`` folder (its newest complete one is used).
        """
        if resume is None or str(resume).lower() in ("none", "null", "false", ""):
            return None
        if str(resume).lower() == "auto":
            found = self.latest_complete()
            self._found_by_auto = found
            return found
        path = Path(resume).expanduser()
        if not path.exists():
            raise CheckpointError(f"resume={resume}: no such checkpoint folder")
        if not path.is_dir():
            raise CheckpointError(f"resume={resume}: is a file; give a checkpoint folder, a checkpoints/ folder or "
                                  "a run's output_dir")
        if (path / "checkpoints").is_dir() and not (path / MARKER).exists():  # a run's output_dir
            path = path / "checkpoints"
        if (path / MARKER).exists() or (path / ".metadata").exists():
            problem = verify_checkpoint(path)
            if problem:
                raise CheckpointError(f"resume={resume}: checkpoint is incomplete or corrupted ({problem})")
            return path
        latest = self.latest_complete(directory=path)
        if latest is None:
            raise CheckpointError(f"resume={resume}: no complete checkpoint in this folder")
        return latest

    # ------------------------------------------------------------------ save
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None, train_state: dict[str, int | float] | None = None) -> Path | None:
        """Write the training state of ``step``; returns the folder, or None when the write failed.

        A failure (e.g. no space left) is reported, the partial folder removed and the previous checkpoint kept.
        """
        final = self.dir / f"{STEP_PREFIX}{step:08d}"
        tmp = self.dir / f"{TMP_PREFIX}{step:08d}"
        error: BaseException | None = None
        try:
            if _rank() == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                for stale in self.dir.glob(f"{TMP_PREFIX}*"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
        except OSError as e:
            error = e
        if _all_ranks_ok(error is None):
            try:
                _broadcast_ddp_buffers(model)
                state = self._state_to_save(step, model, optimizer, scheduler, train_state)
                with _quiet_single_process():
                    dcp.save(state, storage_writer=FileSystemWriter(tmp, sync_files=True), no_dist=not _dist_on())
                _maybe_die_after_tmp_write(step)
            except (OSError, CheckpointException) as e:
                _reraise_interrupt(e)
                error = e
        if _all_ranks_ok(error is None) and _rank() == 0:
            try:
                self._finalize(step, tmp, final)
            except OSError as e:
                error = e
        if not _all_ranks_ok(error is None):
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                previous = self.latest_complete()
                kept = f"previous checkpoint {previous} kept intact" if previous else "no previous checkpoint"
                self._say(f"WARNING: checkpoint at step {step} failed ({_describe(error)}); {kept}")
            _barrier()
            return None
        if _rank() == 0:
            self._prune()
        _barrier()
        self._say(f"checkpoint saved: {final}")
        return final

    def _follow_configured_schedule(self, scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
        """The schedule's multiplier functions come from the config, not the checkpoint (they are not numbers), so
        a resume with another ``max_steps`` follows the new schedule; the learning rates restored with the
        optimizer still hold the old schedule's value for the next step: set them from the new one. With an
        unchanged config both are the same computation, so nothing changes."""
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        scheduled = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        restored = [float(group["lr"]) for group in optimizer.param_groups]
        if scheduled == restored:
            return
        for group, lr in zip(optimizer.param_groups, scheduled):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        scheduler._last_lr = list(scheduled)
        self._say(f"the learning-rate schedule differs from the checkpoint's (max_steps or lr_scheduler changed): "
                  f"training goes on with the configured one, lr {scheduled[0]:.3g} (the checkpoint's schedule had "
                  f"{restored[0]:.3g})")

    def _state_to_save(self, step, model, optimizer, scheduler, train_state) -> dict[str, Any]:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        if scheduler is not None:
            state["scheduler"] = _numeric_state(scheduler.state_dict())
        train = {"step": step, **(train_state or {})}
        state["train"] = _numeric_state(train)
        state["rng"] = {f"rank{_rank()}": capture_rng_state()}
        return state

    def _finalize(self, step: int, tmp: Path, final: Path) -> None:
        files = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = file.relative_to(tmp).as_posix()
            files[rel] = {"size": file.stat().st_size, "sha256": _sha256(file)}
        marker = {"step": step, "world_size": _world_size(), "files": files}
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # an older, broken checkpoint of the same step: the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)

    def _prune(self) -> None:
        if self.keep is None or self.keep <= 0:
            return
        for old in self.checkpoints()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: str | os.PathLike, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> dict[str, Any]:
        """Load ``path`` into model / optimizer / scheduler / RNG; returns the ``train`` counters (with ``step``).

        Raises CheckpointError (one line) when the checkpoint does not fit the model (lists the keys).
        """
        path = Path(path)
        reader = SafeFileSystemReader(path)
        metadata = reader.read_metadata()
        saved = metadata.state_dict_metadata

        model_sd = get_model_state_dict(model)
        try:
            self._check_model_fits(path, model_sd, saved)
        except CheckpointError as err:
            if self._found_by_auto == path:
                raise CheckpointError(f"{err} (resume=auto picked up this earlier run in output_dir; start afresh with "
                                      "resume=none or another output_dir)") from None
            raise
        state: dict[str, Any] = {"model": model_sd}
        if optimizer is not None:
            if not any(k.startswith("optim.") for k in saved):
                raise CheckpointError(f"{path}: holds no optimizer state")
            state["optim"] = _drop_unsaved_optimizer_state(get_optimizer_state_dict(model, optimizer), saved)
        for section in ("train", "scheduler", "rng"):
            if section == "scheduler" and scheduler is None:
                continue
            state[section] = _templates_from_metadata(saved, section)
        try:
            with _quiet_single_process():
                dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner(), no_dist=not _dist_on())
        except CheckpointException as e:
            _reraise_interrupt(e)
            raise CheckpointError(f"{path}: could not load ({_describe(e)})") from None
        except RuntimeError as e:
            raise CheckpointError(f"{path}: could not load ({str(e).splitlines()[0]})") from None

        # Modules whose state-dict hooks rename keys (mmtrain.modules.fusion) map module paths to those names here;
        # without it, under DDP the module path is looked up in the state dict: "Missing key: ...embedding.weight".
        set_model_state_dict(model, state["model"], options=StateDictOptions(dsd_fqn_modifiers="_load_fqn_modifiers"))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
        if scheduler is not None:
            scheduler.load_state_dict(_restore_numeric_state(scheduler.state_dict(), state["scheduler"]))
            if optimizer is not None:
                self._follow_configured_schedule(scheduler, optimizer)
        rng = state["rng"].get(f"rank{_rank()}")
        if rng is not None:
            restore_rng_state(rng)
        else:
            self._say(f"checkpoint {path} has no RNG state for rank {_rank()} (world size changed); "
                      "that rank keeps its seeded generators")
        train = {key: _to_python(value) for key, value in state["train"].items()}
        self._say(f"resumed from {path} (step {train.get('step')})")
        return train

    @staticmethod
    def _check_model_fits(path: Path, model_sd: dict[str, Any], saved: dict[str, Any]) -> None:
        saved_model = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
        missing = sorted(k for k in model_sd if k not in saved_model)
        unexpected = sorted(k for k in saved_model if k not in model_sd)
        mismatched = []
        for key, tensor in model_sd.items():
            meta = saved_model.get(key)
            if isinstance(meta, TensorStorageMetadata) and isinstance(tensor, torch.Tensor):
                if tuple(meta.size) != tuple(tensor.shape):
                    mismatched.append(f"{key} {tuple(meta.size)} vs model {tuple(tensor.shape)}")
        problems = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                problems.append(f"{label}: {shown}")
        if problems:
            raise CheckpointError(f"{path}: does not fit the model; " + "; ".join(problems))


def _drop_unsaved_optimizer_state(optim_sd: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """Parameters that never had a gradient (e.g. an unused pooler) have no optimizer state in the checkpoint;
    leave them out of the load instead of failing on "missing key"."""
    for fqn in list(optim_sd.get("state", {})):
        entry = optim_sd["state"][fqn]
        for key in list(entry):
            if f"optim.state.{fqn}.{key}" not in saved:
                del entry[key]
        if not entry:
            del optim_sd["state"][fqn]
    return optim_sd


def _templates_from_metadata(saved: dict[str, Any], section: str) -> dict[str, Any]:
    """Empty tensors shaped like the saved entries ``<section>.a.b`` as a nested dict ``{a: {b: tensor}}``."""
    out: dict[str, Any] = {}
    for key, meta in saved.items():
        if not key.startswith(section + ".") or not isinstance(meta, TensorStorageMetadata):
            continue
        parts = key[len(section) + 1:].split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    return out


def _wrapped_exceptions(error: CheckpointException) -> list[BaseException]:
    """The per-rank exceptions DCP wrapped in ``error`` (as (exception, traceback frames) pairs)."""
    failures = getattr(error, "_failures", None) or getattr(error, "failures", {})
    found = []
    for failure in failures.values():
        exc = failure[0] if isinstance(failure, tuple) and failure else getattr(failure, "exc", failure)
        if isinstance(exc, BaseException):
            found.append(exc)
    return found


def _reraise_interrupt(error: BaseException) -> None:
    """DCP catches BaseException inside save/load and wraps it in a CheckpointException: a Ctrl-C (or SystemExit)
    that lands mid-write must still end the run, not pass for a failed checkpoint that training survives."""
    if isinstance(error, CheckpointException):
        for exc in _wrapped_exceptions(error):
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise exc from None


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    wrapped = _wrapped_exceptions(error) if isinstance(error, CheckpointException) else []
    if wrapped:
        return _describe(wrapped[0])
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "no space left on device"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"


# ------------------------------------------------------------------------------------------ export
_EXPORT_STEP_PREFIX = "# exported by mmtrain at step "


def export_model(model: torch.nn.Module, directory: str | os.PathLike, config: Any = None,
                 step: int | None = None, *, adapter_weights_only: bool = False) -> Path:
    """Write the final weights: ``save_pretrained`` where the model has it (ALIGN), else ``model.safetensors``.

    A model with LoRA adapters is exported as torchtune's LoRA recipe saves it: the weights with the adapters merged
    in (they load into the model built without LoRA) and the adapters alone in ``adapter_model.safetensors`` +
    ``adapter_config.json``; ``adapter_weights_only`` (torchtune's ``save_adapter_weights_only``) writes only these.

    ``config`` (a DictConfig or dict: the run config) is written next to them as ``config.yaml``, headed by a
    comment with ``step`` when given (read back by ``exported_step``; the file stays a usable config). Collective
    under FSDP (full state dict gathered to rank 0); only rank 0 writes. Written to a temporary folder and
    renamed, so an existing export is replaced only by a complete one.
    """
    from safetensors import SafetensorError

    from mmtrain.modules.lora import LoRALinear

    directory = Path(directory)
    if adapter_weights_only and not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise CheckpointError("save_adapter_weights_only: the model has no LoRA adapters to save")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    error: BaseException | None = None
    if _rank() == 0:
        try:
            _write_export(model, full, directory, config, step, adapter_weights_only)
        except (OSError, SafetensorError) as e:
            error = e
    if not _all_ranks_ok(error is None):
        kept = "the previous export is intact; " if directory.exists() else ""
        raise CheckpointError(f"export to {directory} failed ({_describe(error) if error else 'on rank 0'}); "
                              f"{kept}the checkpoints are kept: free space and rerun to export") from None
    return directory  # (_all_ranks_ok above waited for rank 0's write on every rank)


def _write_export(model: torch.nn.Module, full: dict[str, Any], directory: Path, config: Any,
                  step: int | None, adapter_weights_only: bool = False) -> None:
    """Rank 0's part of ``export_model``: write ``directory.tmp`` and rename it over ``directory``; a failed write
    removes the partial folder."""
    from omegaconf import OmegaConf

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in full.items() if isinstance(v, torch.Tensor)}
        has_adapters = _write_lora_adapters(model, tensors, tmp)
        if not adapter_weights_only:
            _write_weights(model, _merged_lora_weights(model, tensors) if has_adapters else tensors, tmp)
        if config is not None:
            text = OmegaConf.to_yaml(config, resolve=True) if OmegaConf.is_config(config) else (
                OmegaConf.to_yaml(OmegaConf.create(config)))
            header = f"{_EXPORT_STEP_PREFIX}{int(step)}\n" if step is not None else ""
            (tmp / "config.yaml").write_text(header + text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def _write_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    if hasattr(model, "save_pretrained"):
        try:
            model.save_pretrained(folder, state_dict=tensors)
        except TypeError:  # a save_pretrained without the state_dict argument
            model.save_pretrained(folder)
    else:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _write_lora_adapters(model: torch.nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> bool:
    """With LoRA adapters in ``model``, write them alone, as torchtune's LoRA recipe does:
    ``adapter_model.safetensors`` (the ``lora_a``/``lora_b`` tensors and DoRA's ``magnitude``, under the export's key
    names) and ``adapter_config.json`` (PEFT's fields: ``r``, ``lora_alpha``, ``target_modules``, ``peft_type``,
    ``use_dora``). Returns whether there were adapters."""
    from safetensors.torch import save_file

    from mmtrain.modules.lora import DoRALinear, LoRALinear

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    adapters = {k: v for k, v in tensors.items() if k.endswith((".lora_a.weight", ".lora_b.weight", ".magnitude"))}
    if not layers or not adapters:
        return False
    first = next(iter(layers.values()))
    save_file(adapters, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    settings = {"r": first.rank, "lora_alpha": first.alpha, "peft_type": "LORA",
                "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
                "use_dora": any(isinstance(m, DoRALinear) for m in layers.values())}
    (folder / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return True


def _merged_lora_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The export's weights with every adapter merged into its base layer (torchtune's ``get_merged_lora_ckpt``),
    each layer with its own rank and alpha."""
    from mmtrain.modules.lora import LoRALinear, merge_lora_state_dict

    # State-dict keys can differ from module names (FusionLayer's hooks drop ".layer"): find each layer's key
    # through its lora_a parameter.
    layer_of = {id(m.lora_a.weight): m for m in model.modules() if isinstance(m, LoRALinear)}
    ranks, alphas = {}, {}
    for key, value in model.state_dict(keep_vars=True).items():
        layer = layer_of.get(id(value))
        if layer is not None and key.endswith(".lora_a.weight"):
            prefix = key[: -len(".lora_a.weight")]
            ranks[prefix], alphas[prefix] = layer.rank, layer.alpha
    return merge_lora_state_dict(tensors, ranks, alphas)


EARLIER_RUN_FILES = ("checkpoints", "metrics.jsonl", "metrics.png", "model", "tensorboard")


def set_aside_earlier_run(output_dir: str | os.PathLike, log_fn=print) -> Path | None:
    """A run that starts at step 0 in an ``output_dir`` holding an earlier run's files (``resume=none``, or an
    attempt that died before its first checkpoint) moves them into ``output_dir/earlier/<UTC time>/``: its
    checkpoints would otherwise outrank the new run's (highest step kept, newest resumed) and its metrics rows mix
    with the new ones; nothing already written is deleted. Rank 0 moves; every rank waits. Returns the folder."""
    output_dir = Path(output_dir)
    target = None
    if _rank() == 0:
        present = [name for name in EARLIER_RUN_FILES if (output_dir / name).exists()]
        if present:
            target = output_dir / "earlier" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            suffix = 1
            while target.exists():
                suffix += 1
                target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
            target.mkdir(parents=True)
            for name in present:
                os.replace(output_dir / name, target / name)
            log_fn(f"starting at step 0: moved the earlier run's {', '.join(present)} to {target}")
    _barrier()
    return target


def finished_and_exported(directory: str | os.PathLike, step: int, max_steps: int) -> bool:
    """Whether a run resumed at ``step`` has nothing left to do: ``step >= max_steps`` and ``directory`` holds the
    export of that step. Collective: True only when every rank sees it, so no rank skips what others still run."""
    return _all_ranks_ok(step >= max_steps and exported_step(directory) == step)


def exported_step(directory: str | os.PathLike) -> int | None:
    """The training step of a complete export written by ``export_model(..., step=)``, else None."""
    try:
        with open(Path(directory) / "config.yaml") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return None
    return _int_after(_EXPORT_STEP_PREFIX, first)
