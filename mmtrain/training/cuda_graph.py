"""Replay a whole training step (forward, loss, backward, grad clip, optimizer) as one CUDA graph.

A step of many small kernels is bound by the host launching them: ALIGN-base's eager step on an H100 launches about
2,300 kernels in 207 ms of wall time while they run for 153 ms. Captured once and replayed, the step costs one launch.

``GraphedStep(step_fn)`` wraps ``step_fn(inputs) -> outputs``, where ``inputs`` is a dict of CUDA tensors (the batch)
and ``outputs`` a tuple of tensors (the loss, the grad norm). The first ``warmup_steps`` calls run ``step_fn`` eagerly
on a side stream (as real steps: cuBLAS/cuDNN pick their kernels, the optimizer allocates its state), the next call
captures it over static copies of its inputs and replays the graph, and every later call copies the batch into those
copies and replays. A batch whose shapes or dtypes differ from the captured ones runs eagerly, so that a ragged batch
is never replayed over the wrong sizes.

What ``step_fn`` must respect, as for any CUDA graph: no host sync (no ``.item()``, no data-dependent shapes) and no
CPU tensors created per call. Given the ``optimizer``, the capture holds each param group's learning rate in a 0-d
CUDA tensor (and marks the group capturable) so that the replayed kernel reads the schedule's current value: before
each replay the tensors are filled from the groups' float ``lr``, which the scheduler and checkpoints keep seeing as
plain floats. ``step_fn`` sets gradients to None first, so backward allocates them in the graph's pool and each replay
overwrites them.
Random ops (dropout, stochastic depth) draw fresh numbers on every replay (PyTorch advances the Philox offset).

Shapes: ``inputs`` any ``{name: Tensor}``; ``outputs`` any tuple of tensors, returned as the graph's static tensors
(read them, or ``.clone()`` them, before the next call overwrites them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

StepFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]


def _signature(inputs: dict[str, torch.Tensor]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(inputs.items()))


class GraphedStep:
    """Call it as ``step_fn``: eager warm-up steps, then one capture, then replays (see the module docstring)."""

    def __init__(self, step_fn: StepFn, optimizer: torch.optim.Optimizer | None = None, warmup_steps: int = 3) -> None:
        if warmup_steps < 1:
            raise ValueError(f"GraphedStep: warmup_steps must be >= 1 (cuBLAS and the optimizer state need an eager "
                             f"step before capture), got {warmup_steps}")
        self.step_fn = step_fn
        self.optimizer = optimizer
        self._lr_tensors: list[torch.Tensor] = []
        self.warmup_steps = warmup_steps
        self.eager_steps = 0
        self.replays = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static_inputs: dict[str, torch.Tensor] = {}
        self._static_outputs: tuple[torch.Tensor, ...] = ()
        self._signature: tuple | None = None
        self._warned_mismatch = False
        self._side_stream: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.graph is not None:
            if _signature(inputs) == self._signature:
                return self._replay(inputs)
            if not self._warned_mismatch:
                self._warned_mismatch = True
                logger.warning("cuda_graph: a batch of other shapes than the captured one runs eagerly (%s vs %s)",
                               _signature(inputs), self._signature)
            return self._eager(inputs)
        if self.eager_steps < self.warmup_steps:
            return self._eager(inputs)
        self._capture(inputs)
        return self._replay(inputs)

    def _eager(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        # Warm-up on a side stream, as torch.cuda.graph asks: lazily created handles and workspaces must not be
        # made on the stream that is later captured.
        self.eager_steps += 1
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        current = torch.cuda.current_stream()
        self._side_stream.wait_stream(current)
        with torch.cuda.stream(self._side_stream):
            outputs = self.step_fn(inputs)
        current.wait_stream(self._side_stream)
        for tensor in outputs:  # made on the side stream, read on the current one
            tensor.record_stream(current)
        return tuple(outputs)

    def _capture(self, inputs: dict[str, torch.Tensor]) -> None:
        self._static_inputs = {name: tensor.clone() for name, tensor in inputs.items()}
        self._signature = _signature(inputs)
        torch.cuda.synchronize()
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        saved = [(group["lr"], group.get("capturable")) for group in groups]
        self._lr_tensors = [torch.tensor(float(group["lr"]), dtype=torch.float32, device=group["params"][0].device)
                            for group in groups]
        for group, lr in zip(groups, self._lr_tensors):
            group["lr"] = lr
            if "capturable" in group:
                group["capturable"] = True  # the optimizer refuses a capture otherwise
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the DataLoader's pin-memory thread queries CUDA events while the step is captured; in
            # the default global mode such a call from any thread invalidates the capture (seen on an H100 as a
            # cuDNN execution failure mid-capture).
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.step_fn(self._static_inputs)
        except Exception as err:
            raise RuntimeError(f"cuda_graph: capturing the training step as a CUDA graph failed ({err}); "
                               "run with cuda_graph=false") from err
        finally:
            for group, (lr, capturable) in zip(groups, saved):
                group["lr"] = lr
                if capturable is not None:
                    group["capturable"] = capturable
        self._static_outputs = tuple(outputs)
        self.graph = graph

    def _replay(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for name, tensor in inputs.items():
            static = self._static_inputs[name]
            if tensor.data_ptr() != static.data_ptr():
                static.copy_(tensor, non_blocking=True)
        if self.optimizer is not None:
            for group, lr in zip(self.optimizer.param_groups, self._lr_tensors):
                lr.fill_(float(group["lr"]))
        self.graph.replay()  # type: ignore[union-attr]
        self.replays += 1
        return self._static_outputs
