"""CheckpointManager: round trip, corruption fallback, failed writes, keep-N, resume resolution, safe loading."""

import errno
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from mmtrain.errors import CheckpointError
from mmtrain.training.checkpoint import CheckpointManager, export_model, exported_step, verify_checkpoint
from mmtrain.training.schedules import warmup_cosine


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = warmup_cosine(opt, num_training_steps=20, num_warmup_steps=3)
    return model, opt, sched


def _train(model, opt, sched, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(5, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_roundtrip_restores_everything_and_continues_identically(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    mgr = CheckpointManager(tmp_path, keep=2)
    random.seed(11)
    np.random.seed(12)
    path = mgr.save(3, model, opt, sched, {"epoch": 1, "batches_in_epoch": 7, "loss_ema": 0.25})
    assert path.name == "step_00000003" and verify_checkpoint(path) is None
    expected_py, expected_np = random.random(), np.random.rand()
    expected = _train(model, opt, sched, 4)

    model2, opt2, sched2 = _setup(seed=1)
    random.seed(0)
    train = mgr.load(mgr.resolve_resume("auto"), model2, opt2, sched2)
    assert train == {"step": 3, "epoch": 1, "batches_in_epoch": 7, "loss_ema": 0.25}
    assert random.random() == expected_py and np.random.rand() == expected_np
    assert sched2.last_epoch == 3
    assert _train(model2, opt2, sched2, 4) == expected
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_keep_last_n_and_corrupt_falls_back(tmp_path, capsys):
    model, opt, sched = _setup()
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        mgr.save(step, model, opt, sched)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000003"]
    # corrupt one byte of the newest shard
    shard = next((tmp_path / "checkpoints" / "step_00000003").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert mgr.latest_complete().name == "step_00000002"
    assert "step_00000003 is incomplete or corrupted (__0_0.distcp checksum mismatch" in capsys.readouterr().err
    # truncate the older one too: nothing complete is left
    meta = tmp_path / "checkpoints" / "step_00000002" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:10])
    assert mgr.latest_complete() is None
    assert "truncated" in capsys.readouterr().err


def test_missing_marker_is_not_complete(tmp_path):
    model, opt, sched = _setup()
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(5, model, opt, sched)
    (path / "COMPLETE.json").unlink()
    assert mgr.latest_complete() is None
    with pytest.raises(CheckpointError, match="no COMPLETE.json"):
        mgr.resolve_resume(str(path))


@pytest.mark.parametrize("stage", ["write", "read"])
def test_ctrl_c_inside_a_checkpoint_write_or_read_still_interrupts(tmp_path, monkeypatch, stage):
    """DCP wraps whatever its storage layer raises, KeyboardInterrupt included, in a CheckpointException: a Ctrl-C
    that lands mid-write used to be logged as a failed checkpoint while training went on."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    model, opt, sched = _setup()
    mgr = CheckpointManager(tmp_path)
    saved = mgr.save(1, model, opt, sched)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemWriter if stage == "write" else FileSystemReader,
                        "write_data" if stage == "write" else "read_data", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        if stage == "write":
            mgr.save(2, model, opt, sched)
        else:
            mgr.load(saved, model, opt, sched)


def test_no_space_write_keeps_previous(tmp_path, monkeypatch, capsys):
    model, opt, sched = _setup()
    mgr = CheckpointManager(tmp_path)
    first = mgr.save(1, model, opt, sched)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    _train(model, opt, sched, 1)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    assert mgr.save(2, model, opt, sched) is None
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "checkpoint at step 2 failed (no space left on device)" in err
    assert "step_00000001 kept intact" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert mgr.latest_complete() == first


def test_resolve_resume_variants(tmp_path):
    model, opt, sched = _setup()
    mgr = CheckpointManager(tmp_path)
    assert mgr.resolve_resume("auto") is None and mgr.resolve_resume("none") is None
    path = mgr.save(4, model, opt, sched)
    assert mgr.resolve_resume(str(path)) == path
    other = CheckpointManager(tmp_path / "elsewhere")
    assert other.resolve_resume(str(tmp_path / "checkpoints")) == path
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        mgr.resolve_resume(str(tmp_path / "nope"))


def test_wrong_model_lists_mismatched_keys(tmp_path):
    model, opt, sched = _setup()
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, model, opt, sched)
    other = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2), nn.Linear(2, 2))
    with pytest.raises(CheckpointError) as info:
        mgr.load(path, other)
    msg = str(info.value)
    assert "0.weight (8, 4) vs model (16, 4)" in msg and "missing keys: 3.bias, 3.weight" in msg
    assert "\n" not in msg


def test_pickle_that_runs_code_is_refused(tmp_path):
    model, opt, sched = _setup()
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, model, opt, sched)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="unsafe checkpoint index"):
        mgr.load(path, model, opt, sched)
    assert not (tmp_path / "pwned").exists()


def test_export_safetensors_and_config(tmp_path):
    from safetensors.torch import load_file

    model, _, _ = _setup()
    out = export_model(model, tmp_path / "model", {"model": {"_target_": "x.y"}, "seed": 3})
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights["0.weight"], model[0].weight)
    assert "seed: 3" in (out / "config.yaml").read_text()
    assert json.loads(json.dumps(sorted(weights))) == sorted(model.state_dict())
    assert exported_step(out) is None  # no step given

    out = export_model(model, tmp_path / "model", {"seed": 3}, step=12)
    assert exported_step(out) == 12
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(OmegaConf.load(out / "config.yaml")) == {"seed": 3}  # still a config
    assert exported_step(tmp_path / "nowhere") is None


def test_export_on_a_full_disk_is_one_line_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    import safetensors.torch

    model, _, _ = _setup()
    out = export_model(model, tmp_path / "model", {"seed": 3}, step=1)
    before = (out / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"export to .*model failed \(no space left on device\); the "
                                              r"previous export is intact; the checkpoints are kept"):
        export_model(model, tmp_path / "model", {"seed": 3}, step=2)
    assert not (tmp_path / "model.tmp").exists()
    assert (out / "model.safetensors").read_bytes() == before and exported_step(out) == 1


def test_export_of_a_lora_model_merges_the_adapters_and_writes_them_alone_too(tmp_path):
    from safetensors.torch import load_file

    from mmtrain.modules.lora import apply_lora

    torch.manual_seed(0)

    def block_model():
        block = nn.Module()
        block.q_proj, block.v_proj, block.w1 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 8)
        return nn.Sequential(block)

    model = block_model()
    apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4.0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    state = model.state_dict()
    out = export_model(model, tmp_path / "model", {"seed": 3}, step=1)
    weights, adapters = load_file(str(out / "model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert sorted(adapters) == ["0.q_proj.lora_a.weight", "0.q_proj.lora_b.weight", "0.v_proj.lora_a.weight",
                                "0.v_proj.lora_b.weight"]
    assert all(torch.equal(adapters[k], state[k]) for k in adapters)
    assert json.loads((out / "adapter_config.json").read_text()) == {
        "r": 2, "lora_alpha": 4.0, "peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "use_dora": False}
    # torchtune's merged checkpoint: W + (alpha / rank) B A, no adapter keys; it loads into the model without LoRA.
    for name in ("q_proj", "v_proj"):
        a, b = state[f"0.{name}.lora_a.weight"].double(), state[f"0.{name}.lora_b.weight"].double()
        expected = state[f"0.{name}.weight"].double() + 2.0 * b @ a
        torch.testing.assert_close(weights[f"0.{name}.weight"].double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(weights["0.w1.weight"], state["0.w1.weight"])
    block_model().load_state_dict(weights, strict=True)

    only = export_model(model, tmp_path / "adapters", {"seed": 3}, step=1, adapter_weights_only=True)
    assert sorted(p.name for p in only.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "config.yaml"]
    plain = export_model(nn.Linear(2, 2), tmp_path / "plain")
    assert not (plain / "adapter_model.safetensors").exists()
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        export_model(nn.Linear(2, 2), tmp_path / "plain2", adapter_weights_only=True)
    assert not (tmp_path / "plain2").exists()


def test_export_of_a_dora_model_writes_magnitudes_and_merged_weights_that_compute_the_same(tmp_path):
    from safetensors.torch import load_file

    from mmtrain.modules.lora import apply_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Module())
    model[0].q_proj, model[0].w1 = nn.Linear(4, 6), nn.Linear(6, 3)
    apply_lora(model, ["q_proj"], rank=2, alpha=4.0, use_dora=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    x = torch.randn(5, 4)
    expected = model[0].w1(model[0].q_proj(x)).detach()
    out = export_model(model, tmp_path / "model", {"seed": 3}, step=1)
    adapters = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(adapters) == ["0.q_proj.lora_a.weight", "0.q_proj.lora_b.weight", "0.q_proj.magnitude"]
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    plain = nn.Sequential(nn.Module())
    plain[0].q_proj, plain[0].w1 = nn.Linear(4, 6), nn.Linear(6, 3)
    plain.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    torch.testing.assert_close(plain[0].w1(plain[0].q_proj(x)), expected, rtol=1e-5, atol=1e-5)


