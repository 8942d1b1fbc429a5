"""NaN/inf loss policy and a failed checkpoint write, through the CLI on a tiny contrastive run."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

RUN = ["device=cpu", "batch_size=8", "dataset.train_samples=32", "dataset.validation_samples=16",
       "dataset.image_size=16", "model.image_size=16", "eval.batch_size=16", "eval.every_n_steps=100",
       "log.every_n_steps=1", "checkpoint.every_n_steps=2", "checkpoint.keep=5"]


def _cli(capsys, out, *overrides):
    from mmtrain.cli.main import main

    capsys.readouterr()
    status = main(["run", "contrastive", "--config", "align_tiny", f"output_dir={out}", *RUN, *overrides])
    captured = capsys.readouterr()
    return status, captured.out, [line for line in captured.err.splitlines() if line.strip()]


@pytest.fixture
def nan_from_call(monkeypatch):
    """``nan_from_call(n)``: the contrastive loss is NaN from its n-th call on (1-based); eval never calls it."""
    from mmtrain.losses import AlignLoss

    original = AlignLoss.forward

    def arm(first_bad: int):
        calls = {"n": 0}

        def forward(self, *args, **kwargs):
            calls["n"] += 1
            loss = original(self, *args, **kwargs)
            return loss * float("nan") if calls["n"] >= first_bad else loss

        monkeypatch.setattr(AlignLoss, "forward", forward)

    return arm


def _steps(out):
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


def test_nan_stop_names_the_step_and_keeps_last_good_checkpoint(capsys, tmp_path, nan_from_call):
    from mmtrain.training.checkpoint import verify_checkpoint

    nan_from_call(5)  # steps 1-4 fine (checkpoints 2 and 4), NaN from step 5
    status, _, err = _cli(capsys, tmp_path, "max_steps=12", "nonfinite.policy=stop", "nonfinite.max_consecutive=3")
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("error: step 7: non-finite loss=nan") and "3 consecutive steps" in err[0]
    assert _steps(tmp_path) == ["step_00000002", "step_00000004"]
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_00000004") is None


def test_nan_skip_counts_and_finishes(capsys, tmp_path, nan_from_call):
    nan_from_call(4)
    calls_before_nan = 3
    status, out, err = _cli(capsys, tmp_path, "max_steps=6", "nonfinite.policy=skip", "checkpoint.every_n_steps=100")
    assert status == 0, err
    assert out.count("non-finite loss nan") == 6 - calls_before_nan
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in events if e.get("step") == 6 and "nonfinite_steps" in e][-1]["nonfinite_steps"] == 3


def test_no_space_left_keeps_previous_checkpoint(capsys, tmp_path, monkeypatch):
    from mmtrain.training import checkpoint as ckpt

    original = ckpt.dcp.save
    calls = {"n": 0}

    def save(state, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint: the disk fills up half way through
            writer = kwargs["storage_writer"]
            (Path(writer.path) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(state, *args, **kwargs)

    monkeypatch.setattr(ckpt.dcp, "save", save)
    status, out, err = _cli(capsys, tmp_path, "max_steps=4")
    assert status == 0, err
    assert "checkpoint at step 4 failed (no space left on device)" in out
    assert f"previous checkpoint {tmp_path / 'checkpoints' / 'step_00000002'} kept intact" in out
    assert _steps(tmp_path) == ["step_00000002"]  # no half-written folder left behind
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step_00000002") is None
