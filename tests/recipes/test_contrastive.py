"""The contrastive recipe end to end on a tiny config: training, outputs, exact resume, NaN policy."""

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from mmtrain.training.nonfinite import NonFiniteLossError

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "contrastive.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("contrastive_recipe_under_test", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_cfg(output_dir, **overrides):
    cfg = OmegaConf.create({
        "output_dir": str(output_dir), "seed": 0, "max_steps": 6, "resume": "auto", "batch_size": 8,
        "gradient_accumulation_steps": 1, "clip_grad_norm": 1.0, "device": "cpu", "precision": "auto",
        "compile": False, "activation_checkpointing": False, "num_workers": 0,
        "log": {"every_n_steps": 1, "wandb": False, "tensorboard": False},
        "eval": {"every_n_steps": 3, "batch_size": 16}, "checkpoint": {"every_n_steps": 3, "keep": 2},
        "distributed": {"strategy": "ddp"}, "nonfinite": {"policy": "stop", "max_consecutive": 3},
        "model": {"_target_": "mmtrain.models.align.align_tiny", "vocab_size": 72, "image_size": 16,
                  "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                  "vision_width": 16},
        "loss": {"_target_": "mmtrain.losses.AlignLoss", "label_smoothing": 0.1},
        "tokenizer": {"_target_": "mmtrain.data.tokenizers.shapes_tokenizer", "max_length": 12},
        "dataset": {"_target_": "mmtrain.data.shapes.shapes_dataset", "train_samples": 64,
                    "validation_samples": 24, "image_size": 16},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 5e-3, "weight_decay": 0.01},
        "lr_scheduler": {"_target_": "mmtrain.training.schedules.warmup_cosine", "_partial_": True,
                         "num_warmup_steps": 1},
    })
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


def _events(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(output_dir):
    return {e["step"]: e["loss"] for e in _events(output_dir) if "loss" in e}


def test_end_to_end_writes_everything_and_loss_falls(tmp_path, capsys):
    summary = _recipe().main(tiny_cfg(tmp_path, max_steps=12, **{"lr_scheduler.num_warmup_steps": 0}))
    assert summary["steps"] == 12
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 13))
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3))
    evals = [e for e in _events(tmp_path) if "val/zero_shot_acc" in e]
    assert [e["step"] for e in evals] == [3, 6, 9, 12]
    for key in ("val/i2t_r@1", "val/t2i_r@5", "val/i2t_r@10", "val/zero_shot_acc"):
        assert 0.0 <= summary[key] <= 1.0
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "config.json").is_file()
    assert (tmp_path / "model" / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000009", "step_00000012"]
    out = capsys.readouterr().out
    assert "step 12/12 | loss" in out and "samples/s" in out and "grad_norm" in out
    assert "done: 12 steps" in out and str(tmp_path) in out


def _straight_and_killed_at_5(recipe, tmp_path, monkeypatch, **overrides):
    """An uninterrupted run, and one killed at step 5 (after the step-3 checkpoint) then rerun (resume: auto).
    Returns their output_dirs and the rerun's summary."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    recipe.main(tiny_cfg(straight, **overrides))

    class Killed(Exception):
        pass

    def die_at_step_5(step):
        if step == 5:
            raise Killed()

    monkeypatch.setattr(recipe.D, "maybe_inject_fault", die_at_step_5)
    with pytest.raises(Killed):
        recipe.main(tiny_cfg(interrupted, **overrides))
    monkeypatch.undo()
    assert [p.name for p in (interrupted / "checkpoints").iterdir()] == ["step_00000003"]
    return straight, interrupted, recipe.main(tiny_cfg(interrupted, **overrides))


def test_resume_continues_bit_identically(tmp_path, monkeypatch):
    recipe = _recipe()
    straight, interrupted, summary = _straight_and_killed_at_5(recipe, tmp_path, monkeypatch)
    assert summary["steps"] == 6

    expected, resumed = _losses(straight), _losses(interrupted)
    for step in (4, 5, 6):
        assert resumed[step] == expected[step]
    # step 4 was logged before the kill and again after the resume at 3: the file holds each step once
    assert [e["step"] for e in _events(interrupted) if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in _events(interrupted) if "val/zero_shot_acc" in e] == [3, 6]
    from safetensors.torch import load_file

    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(interrupted / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_rerun_of_a_finished_run_neither_evaluates_nor_exports_again(tmp_path, capsys):
    recipe = _recipe()
    first = recipe.main(tiny_cfg(tmp_path))
    metrics_before = (tmp_path / "metrics.jsonl").read_text()
    weights = tmp_path / "model" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert (tmp_path / "model" / "config.yaml").read_text().startswith("# exported by mmtrain at step 6\n")

    again = recipe.main(tiny_cfg(tmp_path))
    assert again["already_complete"] and again["steps"] == 6
    assert again["val/zero_shot_acc"] == first["val/zero_shot_acc"]
    assert again["final_loss"] == _losses(tmp_path)[6]
    assert (tmp_path / "metrics.jsonl").read_text() == metrics_before
    assert weights.stat().st_mtime_ns == written
    assert "already complete: trained to step 6 (max_steps 6)" in capsys.readouterr().out

    more = recipe.main(tiny_cfg(tmp_path, max_steps=7))  # a larger max_steps trains on
    assert more["steps"] == 7 and "already_complete" not in more
    assert sorted(_losses(tmp_path)) == list(range(1, 8))


def test_resume_logs_the_same_window_means(tmp_path, monkeypatch):
    """A log line averages the steps since the previous one; a checkpoint inside that window carries its
    partial sum, so the resumed run's line equals the uninterrupted run's."""
    straight, interrupted, _ = _straight_and_killed_at_5(  # resumes at 3, inside the window of steps 1-4
        _recipe(), tmp_path, monkeypatch, **{"log.every_n_steps": 4, "max_steps": 8})
    assert _losses(interrupted) == _losses(straight)
    assert sorted(_losses(interrupted)) == [4, 8]


def test_resume_with_loader_workers_and_dropout_matches_after_an_evaluation(tmp_path, monkeypatch):
    """The resumed process evaluates afresh (step 6); drawing its loader workers' seed from the global RNG, as the
    validation loader did, shifted dropout's random stream for every later step."""
    straight, interrupted, _ = _straight_and_killed_at_5(
        _recipe(), tmp_path, monkeypatch, max_steps=8, num_workers=2, **{"model.dropout": 0.2})
    assert _losses(interrupted) == _losses(straight)


def _tiny_clip(output_dir, **overrides):
    cfg = tiny_cfg(output_dir, max_steps=2, batch_size=16, **{"eval.every_n_steps": 100, **overrides})
    cfg.model = {"_target_": "mmtrain.models.clip._dual_builders.clip_tiny", "vocab_size": 72, "image_size": 16,
                 "context_length": 12, "embed_dim": 16}
    cfg.loss = {"_target_": "mmtrain.losses.ClipLoss"}
    return cfg


@pytest.mark.parametrize("mode", ["cached", "independent"])
def test_cached_accumulation_trains_like_the_whole_batch(tmp_path, mode):
    """accumulation_mode=cached: 4 micro-batches of 4 give the 16-sample batch's loss and update (every micro-batch
    sees the other 12 samples as negatives; the temperature's gradient counted once); independent does not."""
    from safetensors.torch import load_file

    recipe = _recipe()
    recipe.main(_tiny_clip(tmp_path / "whole"))
    recipe.main(_tiny_clip(tmp_path / mode, gradient_accumulation_steps=4, accumulation_mode=mode))
    whole, accumulated = _losses(tmp_path / "whole"), _losses(tmp_path / mode)
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / mode / "model" / "model.safetensors"))
    if mode == "cached":
        assert accumulated[1] == pytest.approx(whole[1], rel=1e-6)
        assert accumulated[2] == pytest.approx(whole[2], rel=1e-5)
        for key in a:
            if key.endswith("k_proj.bias"):
                continue  # softmax ignores a key bias: its gradient is rounding noise, which Adam scales up to lr
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    else:
        assert accumulated[1] < whole[1] - 0.5  # ln 4 negatives per row against ln 16
        assert not torch.allclose(a["logit_scale"], b["logit_scale"], rtol=0, atol=1e-6)


def test_resume_with_a_longer_run_follows_the_new_schedule(tmp_path, capsys):
    recipe = _recipe()
    recipe.main(tiny_cfg(tmp_path, max_steps=6, **{"lr_scheduler.num_warmup_steps": 1}))
    recipe.main(tiny_cfg(tmp_path, max_steps=10, **{"lr_scheduler.num_warmup_steps": 1}))
    lrs = {e["step"]: e["lr"] for e in _events(tmp_path) if "lr" in e}

    def cosine(step, total, warmup=1):  # warmup_cosine's multiplier, written out
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    for step in range(1, 7):  # the lr a step ran with is set by the scheduler after the step before
        assert lrs[step] == pytest.approx(5e-3 * cosine(step - 1, 6), rel=1e-12, abs=1e-15)
    for step in range(7, 11):
        assert lrs[step] == pytest.approx(5e-3 * cosine(step - 1, 10), rel=1e-12)
    assert "learning-rate schedule differs from the checkpoint's" in capsys.readouterr().out


def test_resume_none_sets_the_earlier_run_aside(tmp_path, capsys):
    """Starting afresh in a used output_dir: the earlier run's checkpoints would outrank the new run's (pruning
    keeps the highest steps; resume=auto takes the newest), so they are moved, not mixed or deleted."""
    recipe = _recipe()
    first = recipe.main(tiny_cfg(tmp_path))  # checkpoints at 3 and 6
    second = recipe.main(tiny_cfg(tmp_path, resume="none", seed=1, max_steps=3))
    assert second["steps"] == 3
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]
    assert sorted(_losses(tmp_path)) == [1, 2, 3]
    (earlier,) = (tmp_path / "earlier").iterdir()
    assert sorted(p.name for p in (earlier / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert sorted(_losses(earlier)) == [1, 2, 3, 4, 5, 6]
    assert (earlier / "model" / "model.safetensors").is_file()
    assert f"moved the earlier run's checkpoints, metrics.jsonl, metrics.png, model to {earlier}" in (
        capsys.readouterr().out)
    again = recipe.main(tiny_cfg(tmp_path, seed=1, max_steps=3))  # resume=auto: the new run, already complete
    assert again["already_complete"] and again["final_loss"] == second["final_loss"] != first["final_loss"]


def _nan_after(recipe, monkeypatch, first_bad_call):
    original = recipe.ContrastiveTask.forward
    calls = {"n": 0}

    def forward(self, *args):
        calls["n"] += 1
        loss, img, txt = original(self, *args)
        if calls["n"] >= first_bad_call:
            loss = loss * float("nan")
        return loss, img, txt

    monkeypatch.setattr(recipe.ContrastiveTask, "forward", forward)


def test_nonfinite_stop_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    recipe = _recipe()
    _nan_after(recipe, monkeypatch, first_bad_call=4)  # steps 1-3 fine (checkpoint at 3), then NaN
    cfg = tiny_cfg(tmp_path, max_steps=10, **{"nonfinite.max_consecutive": 2, "eval.every_n_steps": 100})
    with pytest.raises(NonFiniteLossError, match="step 5: non-finite loss"):
        recipe.main(cfg)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]


def test_nonfinite_skip_counts_and_keeps_weights_finite(tmp_path, monkeypatch):
    recipe = _recipe()
    _nan_after(recipe, monkeypatch, first_bad_call=5)
    cfg = tiny_cfg(tmp_path, **{"nonfinite.policy": "skip", "checkpoint.every_n_steps": 100})
    summary = recipe.main(cfg)
    assert summary["nonfinite_steps"] == 2 and summary["steps"] == 6
    assert math.isfinite(summary["final_loss"])
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


# The demo acceptance run (align_tiny as shipped, zero-shot >= 0.9) lives in tests/recipes/test_demo.py.


def test_normalize_on_device_trains_like_worker_normalization(tmp_path):
    recipe = _recipe()
    summaries = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        summaries[flag] = recipe.main(tiny_cfg(out, max_steps=4, normalize_on_device=flag,
                                               **{"checkpoint.every_n_steps": 0}))
        summaries[flag]["losses"] = _losses(out)
    # the two paths round the normalization differently (~1e-7), so equal within float noise, not bit-equal
    for step, loss in summaries[False]["losses"].items():
        assert math.isclose(summaries[True]["losses"][step], loss, rel_tol=1e-4), step
    assert math.isclose(summaries[True]["val/zero_shot_acc"], summaries[False]["val/zero_shot_acc"])
    with pytest.raises(Exception, match="normalize_on_device"):
        recipe.main(tiny_cfg(tmp_path / "bad", normalize_on_device="sometimes"))


def test_sdpa_backend_preference_trains_the_same_on_cpu(tmp_path):
    recipe = _recipe()
    losses = {}
    for name in ("auto", "cudnn"):
        recipe.main(tiny_cfg(tmp_path / name, max_steps=3, sdpa_backend=name, **{"checkpoint.every_n_steps": 0}))
        losses[name] = _losses(tmp_path / name)
    assert losses["auto"] == losses["cudnn"]  # CPU has no cuDNN attention: the same kernel runs behind it
    from mmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="sdpa_backend: unknown 'fast'"):
        recipe.main(tiny_cfg(tmp_path / "bad", sdpa_backend="fast"))


def _fused(tmp_path, name, host_sync, **overrides):
    return tiny_cfg(tmp_path / name, host_sync=host_sync, **{"optimizer.fused": True, "log.every_n_steps": 3,
                                                            "checkpoint.every_n_steps": 100, **overrides})


def test_host_sync_log_trains_exactly_like_per_step_checks(tmp_path):
    recipe = _recipe()
    runs = {mode: recipe.main(_fused(tmp_path, mode, mode, max_steps=6)) for mode in ("step", "log")}
    def logged(mode):
        keys = ("step", "loss", "grad_norm", "lr", "nonfinite_steps")
        return [{k: e[k] for k in keys} for e in _events(tmp_path / mode) if "loss" in e]

    assert [e["step"] for e in logged("log")] == [3, 6]
    assert logged("log") == logged("step")  # the same numbers, read at log steps instead of every step
    assert runs["step"]["final_loss"] == runs["log"]["final_loss"]


def test_host_sync_log_skips_nonfinite_steps_on_the_device(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    recipe = _recipe()
    _nan_after(recipe, monkeypatch, first_bad_call=5)  # steps 5 and 6 are NaN
    summaries, weights = {}, {}
    for mode in ("step", "log"):
        summaries[mode] = recipe.main(_fused(tmp_path, mode, mode, **{"nonfinite.policy": "skip"}))
        weights[mode] = load_file(str(tmp_path / mode / "model" / "model.safetensors"))
        monkeypatch.undo()
        _nan_after(recipe, monkeypatch, first_bad_call=5)
    assert summaries["log"]["nonfinite_steps"] == summaries["step"]["nonfinite_steps"] == 2
    assert summaries["log"]["final_loss"] == summaries["step"]["final_loss"]
    for key, value in weights["step"].items():  # found_inf left weights and moments exactly as a host skip does
        assert torch.equal(weights["log"][key], value), key


def test_host_sync_log_stop_policy_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    recipe = _recipe()
    _nan_after(recipe, monkeypatch, first_bad_call=4)
    cfg = _fused(tmp_path, "log", "log", max_steps=10, **{"nonfinite.max_consecutive": 2, "eval.every_n_steps": 100,
                                                         "checkpoint.every_n_steps": 3})
    with pytest.raises(NonFiniteLossError, match="step 5: non-finite loss"):
        recipe.main(cfg)
    assert [p.name for p in (tmp_path / "log" / "checkpoints").iterdir()] == ["step_00000003"]


def test_host_sync_log_needs_an_optimizer_that_skips_on_the_device(tmp_path):
    from mmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="host_sync=log: AdamW cannot skip"):
        _recipe().main(tiny_cfg(tmp_path, host_sync="log", **{"optimizer.fused": False}))


def test_channels_last_trains_like_contiguous_and_resumes(tmp_path, monkeypatch):
    """channels_last=true (auto picks it on CUDA for convnet towers) changes strides, not numbers; its checkpoints
    resume and its export loads."""
    from safetensors.torch import load_file

    recipe = _recipe()
    formats = []
    original = recipe.ContrastiveTask.forward

    def forward(self, pixel_values, *args):
        formats.append((pixel_values.is_contiguous(memory_format=torch.channels_last),
                        self.model.vision_model.embeddings.convolution.weight.is_contiguous(
                            memory_format=torch.channels_last)))
        return original(self, pixel_values, *args)

    monkeypatch.setattr(recipe.ContrastiveTask, "forward", forward)
    recipe.main(tiny_cfg(tmp_path / "nchw", channels_last=False))
    assert set(formats) == {(False, False)}
    formats.clear()
    recipe.main(tiny_cfg(tmp_path / "nhwc", channels_last=True))
    assert set(formats) == {(True, True)}
    monkeypatch.undo()
    nchw, nhwc = _losses(tmp_path / "nchw"), _losses(tmp_path / "nhwc")
    assert sorted(nchw) == sorted(nhwc) == list(range(1, 7))
    assert math.isclose(nchw[1], nhwc[1], rel_tol=1e-5)  # the same weights and batch: only summation order differs
    for step in nchw:  # float32 rounding differences, grown by five steps of training at lr 5e-3
        assert math.isclose(nchw[step], nhwc[step], rel_tol=1e-3), step

    resumed = tmp_path / "nhwc_resumed"

    def die_at_step_5(step):
        if step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(recipe.D, "maybe_inject_fault", die_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(tiny_cfg(resumed, channels_last=True))
    monkeypatch.undo()
    recipe.main(tiny_cfg(resumed, channels_last=True))  # resume: auto, from step 3
    for step in (4, 5, 6):
        assert _losses(resumed)[step] == nhwc[step], step
    a, b = load_file(str(tmp_path / "nhwc" / "model" / "model.safetensors")), load_file(
        str(tmp_path / "nchw" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()  # the export is written (safetensors takes contiguous tensors only) and complete
    assert all(a[key].shape == b[key].shape and a[key].is_contiguous() for key in a)


def test_channels_last_auto_stays_off_on_cpu_and_refuses_unknown_values(tmp_path):
    from mmtrain.errors import ConfigError
    from mmtrain.models.align import align_tiny
    from mmtrain.models.clip._dual_builders import clip_tiny

    recipe = _recipe()
    r = recipe.ContrastiveRecipe(tiny_cfg(tmp_path, max_steps=1))
    r.setup()
    try:
        assert r.channels_last is False  # auto: CPU
    finally:
        r.cleanup()
    # auto on CUDA: the convnet tower (batch norms) goes NHWC, the ViT stays as it is
    r.device = torch.device("cuda")
    assert r._use_channels_last(align_tiny(vocab_size=72, image_size=16)) is True
    assert r._use_channels_last(clip_tiny(vocab_size=72, image_size=16, context_length=8)) is False
    with pytest.raises(ConfigError, match="channels_last: expected auto, true or false, got 'nhwc'"):
        recipe.main(tiny_cfg(tmp_path / "bad", channels_last="nhwc"))


def test_data_wait_is_the_share_of_each_window_spent_waiting_for_the_loader(tmp_path, monkeypatch):
    recipe = _recipe()
    delay = 0.2
    slow = tmp_path / "slow"
    original = recipe.ContrastiveRecipe._batches

    def slow_batches(self):
        for batch in original(self):
            time.sleep(delay)  # a loader far slower than a tiny CPU step
            yield batch

    quiet = {"log.every_n_steps": 2, "eval.every_n_steps": 100, "checkpoint.every_n_steps": 100}
    recipe.main(tiny_cfg(tmp_path / "fast", max_steps=4, **quiet))
    monkeypatch.setattr(recipe.ContrastiveRecipe, "_batches", slow_batches)
    recipe.main(tiny_cfg(slow, max_steps=4, **quiet))
    logged = [e for e in _events(slow) if "data_wait" in e]
    assert [e["step"] for e in logged] == [2, 4]
    for event in logged:
        window_s = 16 / event["samples_per_s"]  # two steps of 8 samples
        assert 0.0 <= event["data_wait"] <= 1.0
        # the window's sleeping alone is 2 * delay; the rest is a tiny model's steps
        assert event["data_wait"] == pytest.approx(min(2 * delay / window_s, 1.0), abs=0.1)
        assert event["data_wait"] > 0.5
    fast = [e["data_wait"] for e in _events(tmp_path / "fast") if "data_wait" in e]
    assert len(fast) == 2 and all(0.0 <= w < 0.5 for w in fast)


def test_fused_qkv_trains_like_separate_projections(tmp_path):
    from mmtrain.errors import ConfigError
    from mmtrain.modules.attention import MultiHeadAttention

    recipe = _recipe()
    r = recipe.ContrastiveRecipe(tiny_cfg(tmp_path / "setup", max_steps=1, fused_qkv=True))
    r.setup()
    try:
        attentions = [m for m in r.task.modules() if isinstance(m, MultiHeadAttention)]
        assert attentions and all(m.fused_qkv for m in attentions)
    finally:
        r.cleanup()
    losses = {}
    for flag in (False, True):
        recipe.main(tiny_cfg(tmp_path / str(flag), max_steps=3, fused_qkv=flag, **{"checkpoint.every_n_steps": 0}))
        losses[flag] = _losses(tmp_path / str(flag))
    assert sorted(losses[True]) == [1, 2, 3]
    for step, loss in losses[False].items():  # one matmul instead of three: equal up to float32 rounding
        assert math.isclose(losses[True][step], loss, rel_tol=1e-5), step
    with pytest.raises(ConfigError, match="fused_qkv: expected auto, true or false, got 'always'"):
        recipe.main(tiny_cfg(tmp_path / "bad", fused_qkv="always"))


@pytest.mark.parametrize("name", ["scaled_dot_product", "local", "random", "global", "nystrom", "favor",
                                  "linformer", "orthoformer"])
def test_every_mechanism_swaps_into_the_clip_config_from_the_command_line(name, capsys):
    from mmtrain.cli.main import main

    status = main(["validate", "contrastive", "--config", "clip_tiny", f"model/attention={name}"])
    output = capsys.readouterr()
    if name in ("linformer", "orthoformer"):  # CLIP's text tower is causal; these mix all positions
        assert status == 2 and "cannot be causal" in output.err
    else:
        assert status == 0, output.err


def test_clip_tiny_config_trains_a_few_steps(tmp_path):
    from mmtrain.cli.main import main

    out = tmp_path / "clip"
    assert main(["run", "contrastive", "--config", "clip_tiny", f"output_dir={out}", "max_steps=3",
                 "dataset.train_samples=64", "dataset.validation_samples=32", "eval.every_n_steps=3",
                 "model/attention=local", "log.every_n_steps=1"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert any("val/zero_shot_acc" in r for r in records)


@pytest.mark.parametrize("config", ["align_tiny", "align_minilm", "clip_tiny", "align_base", "clip_vit_b16"])
def test_the_readmes_overrides_apply_as_written(config, capsys):
    from mmtrain.cli.main import main

    for overrides in (["compile=regional"], ["compile=whole"], ["compile=false"],
                      ["distributed.find_unused_parameters=true", "distributed.reduce_dtype=bf16",
                       "distributed.reshard_after_forward=false"]):
        assert main(["print", "contrastive", "--config", config, *overrides]) == 0, capsys.readouterr().err
        capsys.readouterr()
    # `dataset=image_folder dataset.path=DIR` replaces the shapes data whole: no shapes-only key is left behind.
    assert main(["print", "contrastive", "--config", config, "dataset=image_folder", "dataset.path=/data"]) == 0
    dataset = yaml.safe_load(capsys.readouterr().out)["dataset"]
    assert dataset["_target_"].endswith("image_folder_dataset")
    assert not {"train_samples", "validation_samples"} & set(dataset)
