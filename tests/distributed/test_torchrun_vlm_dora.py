"""DoRA fine-tuning of the tiny fusion model under FSDP2 on two ranks (gloo) matches the single-process run with the
same global batch: DoRA's forward reads its whole base weight and both adapters for the row norms, which FSDP2 has
gathered only inside the wrapped layer."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from tests.distributed.launching import launch_env, logged_losses

REPO = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS = 4
RUN = [f"max_steps={STEPS}", "checkpoint.every_n_steps=0", "device=cpu", "batch_size=8", "dataset.train_samples=64",
       "dataset.validation_samples=8", "eval.every_n_steps=0", "eval.max_samples=8", "log.progress_bar=false",
       "log.every_n_steps=1", "model.use_dora=true", "distributed.strategy=fsdp"]


def run(output_dir: pathlib.Path, *launcher: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmtrain.cli.main", "run", "vlm_finetune", "--config", "llama3_2_vision_tiny_lora",
           f"output_dir={output_dir}", *RUN, *launcher]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300, check=False)


def test_dora_under_fsdp_on_two_ranks_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    proc = run(one)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run(two, "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected, got = logged_losses(one), logged_losses(two)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    single, sharded = (load_file(path / "model" / "adapter_model.safetensors") for path in (one, two))
    assert any(key.endswith(".magnitude") for key in single) and sorted(single) == sorted(sharded)
    for key, value in single.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-6, msg=key)
