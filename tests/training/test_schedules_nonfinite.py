import math

import pytest
import torch

from mmtrain.errors import ConfigError
from mmtrain.training.nonfinite import NonFiniteGuard, NonFiniteLossError
from mmtrain.training.schedules import warmup_cosine


def test_warmup_cosine_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, num_training_steps=10, num_warmup_steps=2, min_lr_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0 * 1 / 3) and lrs[1] == pytest.approx(2.0 * 2 / 3)
    assert lrs[2] == pytest.approx(2.0)
    for s in range(2, 12):
        progress = min(1.0, (s - 2) / 8)
        assert lrs[s] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
    assert lrs[11] == pytest.approx(0.2)


def test_warmup_cosine_rejects_bad_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        warmup_cosine(opt, num_training_steps=10, warmup_ratio=1.5)
    with pytest.raises(ConfigError, match="num_training_steps"):
        warmup_cosine(opt, num_training_steps=0)


def test_guard_stop_after_consecutive():
    guard = NonFiniteGuard("stop", max_consecutive=3)
    assert guard.check(1, 1.0, 2.0)
    assert not guard.check(2, float("nan"))
    assert not guard.check(3, 1.0, float("inf"))
    assert guard.check(4, 0.5)  # a finite step resets the run of bad ones
    assert not guard.check(5, float("nan")) and not guard.check(6, float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 7"):
        guard.check(7, float("nan"))
    assert guard.skipped == 5


def test_guard_skip_never_stops_and_state_roundtrip():
    guard = NonFiniteGuard("skip", max_consecutive=1)
    assert not any(guard.check(s, float("nan")) for s in range(10))
    assert guard.skipped == 10
    other = NonFiniteGuard()
    other.load_state_dict(guard.state_dict())
    assert other.skipped == 10
    with pytest.raises(ConfigError, match="nonfinite.policy"):
        NonFiniteGuard("ignore")
