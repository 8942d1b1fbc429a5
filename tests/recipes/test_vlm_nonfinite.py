"""vlm_finetune's NaN/inf policy: ``stop`` ends the run naming the step with the last good checkpoint the newest;
``skip`` leaves the weights untouched by the bad steps, counts them and finishes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mmtrain.config import load, resolve_recipe
from mmtrain.errors import ConfigError
from mmtrain.training.nonfinite import NonFiniteLossError

TINY = ["device=cpu", "batch_size=2", "dataset.train_samples=8", "dataset.validation_samples=2", "eval.batch_size=2",
        "eval.every_n_steps=0", "log.progress_bar=false", "log.every_n_steps=1", "checkpoint.every_n_steps=2"]


def _recipe():
    spec = importlib.util.spec_from_file_location("vlm_finetune_nonfinite_test", resolve_recipe("vlm_finetune"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nan_from_call(recipe, monkeypatch, first_bad_call, last_bad_call=None):
    original, calls = recipe.answer_loss, {"n": 0}

    def answer_loss(logits, labels, **kwargs):
        calls["n"] += 1
        loss = original(logits, labels, **kwargs)
        bad = calls["n"] >= first_bad_call and (last_bad_call is None or calls["n"] <= last_bad_call)
        return loss * float("nan") if bad else loss

    monkeypatch.setattr(recipe, "answer_loss", answer_loss)


def _cfg(out, *overrides):
    return load("vlm_finetune", "llama3_2_vision_tiny", [f"output_dir={out}", *TINY, *overrides])


def _steps(out):
    events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e for e in events if "loss" in e and "step" in e}


def test_stop_policy_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    recipe = _recipe()
    _nan_from_call(recipe, monkeypatch, first_bad_call=4)  # steps 4, 5, 6 are NaN
    with pytest.raises(NonFiniteLossError, match=r"^step 6: non-finite loss=nan.* for 3 consecutive steps"):
        recipe.main(_cfg(tmp_path, "max_steps=8"))
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002"]  # step 4 was NaN: no checkpoint written for it
    assert _steps(tmp_path)[5]["nonfinite_steps"] == 2


def test_skip_policy_leaves_the_weights_alone_on_bad_steps_and_counts_them(tmp_path, monkeypatch):
    recipe = _recipe()
    _nan_from_call(recipe, monkeypatch, first_bad_call=3, last_bad_call=4)  # steps 3 and 4
    captured = {}
    original_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        captured.setdefault("calls", 0)
        captured["calls"] += 1
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    summary = recipe.main(_cfg(tmp_path, "max_steps=5", "nonfinite.policy=skip"))
    assert summary["nonfinite_steps"] == 2 and captured["calls"] == 3  # steps 1, 2 and 5 applied
    steps = _steps(tmp_path)
    assert [steps[s]["nonfinite_steps"] for s in range(1, 6)] == [0, 0, 1, 2, 2]
    assert torch.isfinite(torch.tensor(steps[5]["loss"])) and summary["loss"] == steps[5]["loss"]


def test_unknown_policy_is_a_config_error_before_anything_is_built(tmp_path):
    with pytest.raises(ConfigError, match="nonfinite.policy: must be one of stop, skip, got 'ignore'"):
        _recipe().main(_cfg(tmp_path, "max_steps=1", "nonfinite.policy=ignore"))
