"""The default demo (`make demo` = `mmtrain run contrastive --config align_tiny`) as shipped: the built-in config,
composed by `mmtrain.config.load`, trained by the contrastive recipe, must end with validation zero-shot >= 0.9."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mmtrain.config import instantiate, load

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "contrastive.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("contrastive_recipe_demo_under_test", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_model_batch_norm_tracks_within_a_short_run():
    """ALIGN's TF momentum 0.99 (PyTorch 0.01) would leave the eval-mode running statistics ~100 steps behind the
    weights of a few-hundred-step run; the demo's align_tiny keeps TF 0.9, i.e. PyTorch momentum 0.1."""
    cfg = load("contrastive", "align_tiny", ["device=cpu"])
    model = instantiate(cfg.model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == pytest.approx(1.0 - cfg.model.batch_norm_momentum) for m in norms)
    assert all(m.momentum == pytest.approx(0.1) for m in norms)


@pytest.mark.slow
def test_align_tiny_demo_reaches_zero_shot_090(tmp_path, capsys):
    """The whole demo run (about a minute of CPU time): zero-shot accuracy >= 0.9 in the summary, in
    metrics.jsonl and on the final summary line."""
    cfg = load("contrastive", "align_tiny", [f"output_dir={tmp_path}", "device=cpu"])
    summary = _recipe().main(cfg)

    assert summary["steps"] == cfg.max_steps
    assert summary["val/num_classes"] == 24  # the validation split's distinct captions
    assert summary["val/zero_shot_acc"] >= 0.9, summary
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final_eval = [e for e in events if "val/zero_shot_acc" in e][-1]
    assert final_eval["step"] == cfg.max_steps
    assert final_eval["val/zero_shot_acc"] == pytest.approx(summary["val/zero_shot_acc"])
    done_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")][-1]
    assert f"val/zero_shot_acc {summary['val/zero_shot_acc']:.3f}" in done_line
    assert (tmp_path / "model" / "model.safetensors").is_file()
