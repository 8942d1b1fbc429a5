"""time_steps: warm-up calls untimed, one duration per timed call, CUDA events when on a GPU; measure_variant: a
failing variant becomes a record, not an exception."""

import json

import pytest
import torch

from mmtrain.bench._timing import time_steps


def test_cpu_counts_warmup_and_timed_calls():
    calls = []
    times = time_steps(lambda: calls.append(len(calls)), warmup=2, steps=3, device=torch.device("cpu"))
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_events_time_each_queued_step():
    x = torch.randn(2048, 2048, device="cuda")
    times = time_steps(lambda: x @ x, warmup=1, steps=4, device=torch.device("cuda"))
    assert len(times) == 4 and all(t > 0 for t in times)


def test_a_failing_variant_is_recorded_and_printed_not_raised(capsys):
    from mmtrain.bench._timing import measure_variant

    def broken():
        raise RuntimeError("compile failed")

    failed = measure_variant("mmtrain_compiled", broken, tiles_per_s=None)
    assert failed == {"name": "mmtrain_compiled", "error": "RuntimeError: compile failed", "tiles_per_s": None}
    ok = measure_variant("mmtrain", lambda: {"name": "mmtrain", "samples_per_s": 2.0, "config": {"big": 1}})
    assert ok["config"] == {"big": 1}
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [failed, {"name": "mmtrain", "samples_per_s": 2.0}]  # one line each, config left out
