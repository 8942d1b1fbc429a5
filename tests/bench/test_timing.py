"""time_steps: warm-up calls untimed, one duration per timed call, CUDA events when on a GPU."""

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
