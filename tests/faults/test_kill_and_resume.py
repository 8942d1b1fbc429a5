"""Faults: kill -9 a tiny CPU contrastive run mid-training and mid-checkpoint-write, rerun the same command, and
end with the same final loss and bit-identical exported weights as an uninterrupted run; NaN policy; full disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# 24 steps with a checkpoint every 4: long enough to be killed in the middle, a few seconds in all.
RUN = ["device=cpu", "max_steps=24", "batch_size=8", "dataset.train_samples=64", "dataset.validation_samples=16",
       "dataset.image_size=16", "model.image_size=16", "eval.batch_size=16", "eval.every_n_steps=100",
       "log.every_n_steps=1", "checkpoint.every_n_steps=4", "checkpoint.keep=2", "lr_scheduler.num_warmup_steps=2"]


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "mmtrain.cli.main", "run", "contrastive", "--config", "align_tiny",
            f"output_dir={out}", *RUN]


def _env(**extra) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(_command(out), env=_env(**env), capture_output=True, text=True, timeout=600)


def _final_loss(out: Path) -> float:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [e["loss"] for e in events if e.get("step") == 24 and "loss" in e][-1]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def _complete(out: Path) -> list[str]:
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.glob("step_*") if (p / "COMPLETE.json").is_file()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    done = _run(out)
    assert done.returncode == 0, done.stderr
    return out


def _assert_same_as(resumed: Path, reference: Path) -> None:
    assert _final_loss(resumed) == _final_loss(reference)
    a, b = _weights(reference), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_resumes_bit_identically(uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not _complete(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "model").exists()  # killed mid-training: nothing exported yet
    killed_at = _complete(out)
    assert killed_at and killed_at[-1] != "step_00000024"

    rerun = _run(out)
    assert rerun.returncode == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    _assert_same_as(out, uninterrupted)


@pytest.mark.slow
def test_kill_mid_checkpoint_write_then_rerun_resumes_from_previous(uninterrupted, tmp_path):
    out = tmp_path / "run"
    died = _run(out, MMTRAIN_FAULT_AFTER_TMP_WRITE="8")  # dies with step 8's files in .tmp_step_00000008
    assert died.returncode == 137, died.stderr
    checkpoints = out / "checkpoints"
    assert _complete(out) == ["step_00000004"]
    assert (checkpoints / ".tmp_step_00000008").is_dir() and not (checkpoints / "step_00000008").exists()

    rerun = _run(out)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {checkpoints / 'step_00000004'} (step 4)" in rerun.stdout
    assert not list(checkpoints.glob(".tmp_*"))
    _assert_same_as(out, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("launch", [[], ["--nproc-per-node", "2"]], ids=["one-process", "two-ranks"])
def test_ctrl_c_ends_a_run_with_one_line_and_status_130(tmp_path, launch):
    """Ctrl-C reaches every process of the group: each rank stops, rank 0 and the launcher say so once each, no
    tracebacks, exit status 130, and the checkpoints written so far stay."""
    out = tmp_path / "run"
    command = _command(out) + launch + ["max_steps=100000", "checkpoint.every_n_steps=2"]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _complete(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "terminate called" not in err, err
    assert err.count("interrupted") == (2 if launch else 1), err
    assert _complete(out)
