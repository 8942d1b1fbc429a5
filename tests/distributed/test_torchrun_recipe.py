"""`mmtrain run contrastive` with a tiny CLIP on two gloo ranks through the real launcher: checkpoints move between
world sizes (saved on 2 ranks resume on 1 and the reverse, continuing like the uninterrupted run), and a rank killed
once is restarted by ``--max-restarts 1`` and the run finishes with the uninterrupted run's loss."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from tests.distributed.launching import launch_env, logged_losses

REPO = pathlib.Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "contrastive.py"
pytestmark = pytest.mark.slow

STEPS, CKPT_EVERY = 6, 3


def tiny_clip_cfg(output_dir: pathlib.Path, max_steps: int = STEPS, device: str = "cpu") -> dict:
    return {
        "output_dir": str(output_dir), "seed": 0, "max_steps": max_steps, "resume": "auto", "batch_size": 8,
        "gradient_accumulation_steps": 1, "clip_grad_norm": 1.0, "device": device, "precision": "fp32",
        "compile": False, "activation_checkpointing": False, "num_workers": 0,
        "log": {"every_n_steps": 1, "wandb": False, "tensorboard": False},
        "eval": {"every_n_steps": 100, "batch_size": 16}, "checkpoint": {"every_n_steps": CKPT_EVERY, "keep": 2},
        "distributed": {"strategy": "ddp"}, "nonfinite": {"policy": "stop", "max_consecutive": 3},
        "model": {"_target_": "mmtrain.models.clip._dual_builders.clip_tiny", "vocab_size": 128, "image_size": 16,
                  "context_length": 16, "embed_dim": 16},
        "loss": {"_target_": "mmtrain.losses.ClipLoss"},
        "tokenizer": {"_target_": "mmtrain.data.tokenizers.shapes_tokenizer", "max_length": 12},
        "dataset": {"_target_": "mmtrain.data.shapes.shapes_dataset", "train_samples": 64,
                    "validation_samples": 16, "image_size": 16},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 5e-3, "weight_decay": 0.01},
        "lr_scheduler": {"_target_": "mmtrain.training.schedules.warmup_cosine", "_partial_": True,
                         "num_warmup_steps": 1},
    }


def _recipe():
    spec = importlib.util.spec_from_file_location("contrastive_recipe_distributed_test", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_rank(output_dir: pathlib.Path, max_steps: int = STEPS, device: str = "cpu") -> None:
    assert "WORLD_SIZE" not in os.environ
    _recipe().main(OmegaConf.create(tiny_clip_cfg(output_dir, max_steps, device)))


def two_ranks(tmp_path: pathlib.Path, output_dir: pathlib.Path, max_steps: int = STEPS, *extra: str,
              env_extra: dict | None = None, device: str = "cpu", cfg: dict | None = None) -> subprocess.CompletedProcess:
    config = tmp_path / f"tiny_clip_{output_dir.name}.yaml"
    cfg = tiny_clip_cfg(output_dir, max_steps, device) if cfg is None else cfg
    config.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    env = launch_env(**(env_extra or {}))
    cmd = [sys.executable, "-m", "mmtrain.cli.main", "run", "contrastive", "--config", str(config),
           "--nproc-per-node", "2", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def _assert_continuation(expected: dict[int, float], got: dict[int, float], tolerance: float = 1e-5) -> None:
    for step in range(CKPT_EVERY + 1, STEPS + 1):
        assert abs(expected[step] - got[step]) < tolerance, (step, expected[step], got[step])


def _rewind_to_first_checkpoint(output_dir: pathlib.Path) -> None:
    """Leave only the step-3 checkpoint, as if the run had stopped there (same max_steps, so the same schedule)."""
    checkpoints = sorted(p for p in (output_dir / "checkpoints").iterdir() if p.is_dir())
    assert [p.name for p in checkpoints] == [f"step_{CKPT_EVERY:08d}", f"step_{STEPS:08d}"]
    shutil.rmtree(checkpoints[-1])


def test_checkpoint_moves_between_world_sizes(tmp_path):
    reference = tmp_path / "one_rank_uninterrupted"
    one_rank(reference)
    expected = logged_losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))

    # Saved on 2 ranks, resumed on 1.
    saved_on_two = tmp_path / "saved_on_two"
    proc = two_ranks(tmp_path, saved_on_two)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = logged_losses(saved_on_two)
    for step in range(1, STEPS + 1):  # the 2-rank run itself matches the 1-rank run
        assert abs(two[step] - expected[step]) < 1e-5, (step, two[step], expected[step])
    _rewind_to_first_checkpoint(saved_on_two)
    one_rank(saved_on_two)
    _assert_continuation(expected, logged_losses(saved_on_two))

    # Saved on 1 rank, resumed on 2.
    saved_on_one = tmp_path / "saved_on_one"
    shutil.copytree(reference, saved_on_one)
    _rewind_to_first_checkpoint(saved_on_one)
    (saved_on_one / "metrics.jsonl").write_text("")
    proc = two_ranks(tmp_path, saved_on_one)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout and f"step_{CKPT_EVERY:08d}" in proc.stdout
    _assert_continuation(expected, logged_losses(saved_on_one))


# Two GPUs: the same crash and restart over NCCL, one GPU per rank, against one GPU uninterrupted. cuDNN
# convolutions run in TF32 by default and pick their algorithm by batch size, hence the looser match there.
TWO_GPUS = pytest.param("cuda", 1e-3, marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")])


@pytest.mark.parametrize("device,tolerance", [("cpu", 1e-5), TWO_GPUS])
def test_killed_rank_is_restarted_and_run_finishes(tmp_path, device, tolerance):
    reference = tmp_path / "reference"
    one_rank(reference, device=device)
    expected = logged_losses(reference)
    run_dir = tmp_path / "faulty"
    # Rank 1 dies right after step 4 (after the step-3 checkpoint) on the first attempt only.
    proc = two_ranks(tmp_path, run_dir, STEPS, "--max-restarts", "1", device=device,
                     env_extra={"MMTRAIN_FAULT_STEP": "4", "MMTRAIN_FAULT_RANK": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "= 2 rank(s)" in proc.stdout and (device == "cpu" or "cuda:" in proc.stdout), proc.stdout
    # The group was restarted and resumed from the step-3 checkpoint (the crash came after step 4).
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{CKPT_EVERY:08d}'}" in proc.stdout, proc.stdout
    got = logged_losses(run_dir)
    assert max(got) == STEPS
    _assert_continuation(expected, got, tolerance)


def test_fsdp_align_run_clips_checkpoints_and_exports_on_two_ranks(tmp_path):
    """FSDP2 over two gloo ranks, ALIGN: the grad clip takes the sharded (DTensor) gradients, and the export
    writes the gathered weights in HF layout (both failed before: a DTensor assertion in the clip on CPU, and
    save_pretrained reading the sharded parameters)."""
    from mmtrain.models.align import AlignModel

    run_dir = tmp_path / "fsdp_align"
    cfg = tiny_clip_cfg(run_dir, 4)
    cfg.update(distributed={"strategy": "fsdp"}, checkpoint={"every_n_steps": 2, "keep": 2},
               model={"_target_": "mmtrain.models.align.align_tiny", "vocab_size": 72, "image_size": 16,
                      "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                      "vision_width": 16},
               loss={"_target_": "mmtrain.losses.AlignLoss", "label_smoothing": 0.1})
    proc = two_ranks(tmp_path, run_dir, 4, cfg=cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "= 2 rank(s)" in proc.stdout
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    norms = [e["grad_norm"] for e in events if "grad_norm" in e]
    assert len(norms) == 4 and all(0 < n < float("inf") for n in norms)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    exported = AlignModel.from_pretrained(run_dir / "model")  # strict: every weight present, with its shape
    torch.manual_seed(0)  # the recipe's seed: the initial weights, which four steps at lr 5e-3 must have moved
    initial = AlignModel(exported.config).state_dict()
    assert all(torch.isfinite(v).all() for v in exported.state_dict().values())
    assert not torch.equal(exported.state_dict()["text_projection.weight"], initial["text_projection.weight"])


def test_ddp_restart_reproduces_the_batchnorm_statistics_of_the_uninterrupted_run(tmp_path):
    """Under DDP each rank updates its own BatchNorm statistics and DDP hands rank 0's to all before each forward;
    the checkpoint must hold rank 0's (it held another rank's copy), so a restarted run exports the same model."""
    from safetensors.torch import load_file

    def align_cfg(run_dir):
        cfg = tiny_clip_cfg(run_dir, STEPS)
        cfg.update(model={"_target_": "mmtrain.models.align.align_tiny", "vocab_size": 72, "image_size": 16,
                          "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "intermediate_size": 32, "vision_width": 16},
                   loss={"_target_": "mmtrain.losses.AlignLoss", "label_smoothing": 0.1})
        return cfg

    straight, faulty = tmp_path / "straight", tmp_path / "faulty"
    proc = two_ranks(tmp_path, straight, STEPS, cfg=align_cfg(straight))
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = two_ranks(tmp_path, faulty, STEPS, "--max-restarts", "1", cfg=align_cfg(faulty),
                     env_extra={"MMTRAIN_FAULT_STEP": "4", "MMTRAIN_FAULT_RANK": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {faulty / 'checkpoints' / f'step_{CKPT_EVERY:08d}'}" in proc.stdout, proc.stdout
    expected, got = (load_file(str(d / "model" / "model.safetensors")) for d in (straight, faulty))
    assert any("running_mean" in key for key in expected)
    assert expected.keys() == got.keys()
    assert [key for key in expected if not torch.equal(expected[key], got[key])] == []
