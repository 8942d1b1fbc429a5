"""`mmtrain run vlm_finetune --nproc-per-node 2` (DDP over gloo) resumes from its own checkpoint and continues
exactly like the uninterrupted 2-rank run. Before the fix every resume failed on both ranks with
``Missing key: decoder.tok_embeddings.embedding.weight``: the fusion modules' state-dict hooks rename keys
(``embedding.weight`` -> ``weight``, ``layer.`` dropped), and under DDP set_model_state_dict looked the module
paths up in the checkpoint's state dict."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.distributed.launching import launch_env, logged_losses

REPO = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS, CKPT_EVERY = 6, 3
RUN = [f"max_steps={STEPS}", f"checkpoint.every_n_steps={CKPT_EVERY}", "device=cpu", "batch_size=8",
       "dataset.train_samples=64", "dataset.validation_samples=8", "eval.every_n_steps=0", "eval.max_samples=8",
       "log.progress_bar=false", "log.every_n_steps=1", "distributed.strategy=ddp"]


def two_ranks(output_dir: pathlib.Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmtrain.cli.main", "run", "vlm_finetune", "--config", "llama3_2_vision_tiny",
           f"output_dir={output_dir}", *RUN, "--nproc-per-node", "2"]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300, check=False)


def test_vlm_finetune_resumes_on_two_ranks_like_the_uninterrupted_run(tmp_path):
    reference = tmp_path / "uninterrupted"
    proc = two_ranks(reference)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = logged_losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))

    # The same run stopped after its step-3 checkpoint (same max_steps, so the same schedule), then rerun.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
    shutil.rmtree(resumed / "model", ignore_errors=True)
    proc = two_ranks(resumed)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {resumed / 'checkpoints' / f'step_{CKPT_EVERY:08d}'}" in proc.stdout, proc.stdout
    got = logged_losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(CKPT_EVERY + 1, STEPS + 1):  # same ranks, same reduction order: bit for bit
        assert got[step] == expected[step], (step, expected[step], got[step])
