"""What to do when a step's loss or gradient norm is NaN or infinite (config ``nonfinite``).

- ``policy: skip``: the optimizer step is skipped (weights untouched), the step counted, training goes on.
- ``policy: stop`` (default): like skip, but ``max_consecutive`` non-finite steps in a row (default 3) end the
  run with :class:`NonFiniteLossError` naming the step. No checkpoint is written for a bad step, so the last
  good checkpoint stays the newest one.
"""

from __future__ import annotations

import math

from mmtrain.errors import ConfigError, UserError

POLICIES = ("stop", "skip")


class NonFiniteLossError(UserError):
    """Training diverged: too many consecutive steps with NaN/inf loss or gradient norm."""


class NonFiniteGuard:
    """Decides, per optimizer step, whether to apply it; counts skipped steps.

    Args:
        policy: ``"stop"`` or ``"skip"``.
        max_consecutive: with ``stop``, how many non-finite steps in a row end the run (>= 1).
    """

    def __init__(self, policy: str = "stop", max_consecutive: int = 3) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"nonfinite.policy: must be one of {', '.join(POLICIES)}, got {policy!r}")
        if int(max_consecutive) < 1:
            raise ConfigError(f"nonfinite.max_consecutive: must be >= 1, got {max_consecutive}")
        self.policy = policy
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.skipped = 0

    def check(self, step: int, loss: float, grad_norm: float | None = None) -> bool:
        """True when the step may be applied; False to skip it; raises when the policy says stop."""
        values = [loss] if grad_norm is None else [loss, grad_norm]
        if all(math.isfinite(v) for v in values):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        if self.policy == "stop" and self.consecutive >= self.max_consecutive:
            what = f"loss={loss}" + ("" if grad_norm is None else f", grad_norm={grad_norm}")
            raise NonFiniteLossError(
                f"step {step}: non-finite {what} for {self.consecutive} consecutive steps "
                f"(nonfinite.policy=stop, max_consecutive={self.max_consecutive}); the last good checkpoint is "
                "kept; lower optimizer.lr or set nonfinite.policy=skip")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_consecutive": self.consecutive, "nonfinite_skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state.get("nonfinite_consecutive", 0))
        self.skipped = int(state.get("nonfinite_skipped", 0))
