"""Single-process behaviour of mmtrain.training.distributed: environment reading, the global-batch rule, no-op
collectives, wrapping, per-layer activation checkpointing, compile wiring and the fault-injection hook.
(Multi-process behaviour: tests/distributed/.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mmtrain.errors import ConfigError
from mmtrain.models.clip._dual_builders import clip_tiny
from mmtrain.training import distributed


def _batch():
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.long)
    return torch.randn(2, 3, 32, 32, generator=gen), torch.randint(1, 50, (2, 6), generator=gen), mask


def _loss(model, pixels, ids, mask):
    out = distributed.dual_encoder_forward(model, pixels, ids, mask)
    return (out.logit_scale * out.image_embeds @ out.text_embeds.T).logsumexp(-1).mean()


def test_init_distributed_single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = distributed.init_distributed(device="cpu")
    assert info == distributed.DistInfo(0, 1, 0, torch.device("cpu"), True)
    assert not info.is_distributed and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.init_distributed(device="cpu")


@pytest.mark.parametrize(
    "global_batch,world,micro,expected",
    [(256, 1, None, (256, 256, 1)), (256, 2, None, (128, 128, 1)), (256, 2, 32, (128, 32, 4)),
     (8, 8, None, (1, 1, 1)), (12, 3, 64, (4, 4, 1))],
)
def test_split_global_batch(global_batch, world, micro, expected):
    split = distributed.split_global_batch(global_batch, world, micro)
    assert (split.per_rank_batch_size, split.micro_batch_size, split.accumulation_steps) == expected
    assert split.world_size * split.accumulation_steps * split.micro_batch_size == global_batch


def test_split_global_batch_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^dataset\.batch_size: global batch size 10 is not divisible by the world size 4"):
        distributed.split_global_batch(10, 4, key="dataset.batch_size")
    with pytest.raises(ConfigError, match="micro-batch size 3"):
        distributed.split_global_batch(16, 2, 3)
    with pytest.raises(ConfigError, match=">= 1"):
        distributed.split_global_batch(0, 1)


def test_collectives_are_identity_in_one_process():
    x = torch.tensor([1.0, 2.0])
    out = distributed.all_reduce_mean(x)
    assert torch.equal(out, x) and out is not x
    assert distributed.all_reduce_mean(torch.tensor(3)).item() == 3
    distributed.barrier()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.get_dist_info() == (0, 1)
    distributed.destroy()


def test_wrap_model_single_process_and_bad_strategy():
    model = clip_tiny(vocab_size=50)
    for strategy in ("none", "ddp", "fsdp"):
        assert distributed.wrap_model(model, strategy=strategy, device="cpu") is model
    with pytest.raises(ConfigError, match=r"distributed\.strategy: expected one of none, ddp, fsdp, got 'zero3'"):
        distributed.wrap_model(model, strategy="zero3")
    with pytest.raises(ConfigError, match="mixed_precision"):
        distributed._mixed_precision_dtype("int8")
    assert distributed._mixed_precision_dtype(True) is torch.bfloat16
    assert distributed._mixed_precision_dtype("none") is None
    assert distributed.unwrap_model(model) is model


def test_activation_checkpointing_recomputes_each_layer_and_keeps_gradients_and_keys():
    torch.manual_seed(0)
    plain = clip_tiny(vocab_size=50)
    torch.manual_seed(0)
    checkpointed = clip_tiny(vocab_size=50)
    keys = list(checkpointed.state_dict())
    assert distributed.apply_activation_checkpointing(checkpointed) == 4
    assert list(checkpointed.state_dict()) == keys
    mlp_calls = []
    # A pre-hook: recomputation stops as soon as the saved tensors are rebuilt, before a post-hook would run.
    checkpointed.layer_modules()[0].mlp.register_forward_pre_hook(lambda *a: mlp_calls.append(1))
    batch = _batch()
    _loss(plain, *batch).backward()
    loss = _loss(checkpointed, *batch)
    assert len(mlp_calls) == 1
    loss.backward()
    assert len(mlp_calls) == 2  # the forward ran again during backward: activations were not kept
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    with torch.no_grad():  # no recompute machinery without grad
        _loss(checkpointed, *batch)
    assert len(mlp_calls) == 3


@pytest.mark.parametrize("mode", ["regional", "whole"])
def test_compile_model_keeps_outputs_and_keys(mode):
    torch.manual_seed(0)
    model = clip_tiny(vocab_size=50)
    batch = _batch()
    before = model(*batch)
    keys = list(model.state_dict())
    # The eager backend checks the wiring (what gets compiled) without paying for code generation on CPU.
    distributed.compile_model(model, mode=mode, backend="eager")
    assert list(model.state_dict()) == keys
    if mode == "regional":
        assert all(layer._compiled_call_impl is not None for layer in model.layer_modules())
    else:
        assert hasattr(model.encode_image, "_torchdynamo_orig_callable") or "encode_image" in vars(model)
    after = model(*batch)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])
    with pytest.raises(ConfigError, match="compile"):
        distributed.compile_model(model, mode="everything")


def test_regional_compile_raises_the_recompile_limit_past_the_layer_count():
    from torch._dynamo.utils import counters

    config = torch._dynamo.config
    option = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    layers = [nn.Linear(i + 1, i + 1) for i in range(12)]  # twelve shapes: twelve compiled variants of one forward
    # config.patch, not monkeypatch: the config module's attributes are not plain ones, and monkeypatch's undo
    # left `recompile_limit` unreadable for the tests after this one.
    with config.patch(**{option: 8}):
        distributed.compile_model(nn.Sequential(*layers), mode="regional", layer_modules=layers, backend="eager")
        assert getattr(config, option) == 36
        counters.clear()
        for grad_mode in (True, False):  # training, then eval under no_grad: a second variant of each layer
            with torch.set_grad_enabled(grad_mode):
                for i, layer in enumerate(layers):
                    x = torch.randn(2, i + 1)
                    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
        assert counters["stats"]["unique_graphs"] == 24  # every variant compiled: none fell back to eager


def test_grad_sync_is_noop_for_plain_model():
    model = torch.nn.Linear(2, 2)
    with distributed.grad_sync(model, enabled=False):
        model(torch.ones(1, 2)).sum().backward()
    assert model.weight.grad is not None


def test_fault_injection_only_on_chosen_rank_step_and_first_attempt(monkeypatch):
    monkeypatch.setenv("MMTRAIN_FAULT_STEP", "3")
    monkeypatch.setenv("RANK", "0")
    distributed.maybe_inject_fault(3)  # rank 0 is not the chosen rank (default 1)
    monkeypatch.setenv("RANK", "1")
    distributed.maybe_inject_fault(2)  # not the step
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    distributed.maybe_inject_fault(3)  # after a restart
    code = "from mmtrain.training.distributed import maybe_inject_fault as f; f(2); f(3); print('survived')"
    env = {"MMTRAIN_FAULT_STEP": "3", "RANK": "1", "TORCHELASTIC_RESTART_COUNT": "0", "PATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 13 and "survived" not in proc.stdout, proc.stderr


def test_unused_contrastive_parameters_are_frozen_and_ddp_skips_its_search():
    from mmtrain.models.align import align_tiny

    align = align_tiny(vocab_size=64, image_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, vision_width=16)
    assert distributed.freeze_unused_contrastive_parameters(align) is False
    frozen = {n for n, p in align.named_parameters() if not p.requires_grad}
    assert frozen == {"text_model.pooler.dense.weight", "text_model.pooler.dense.bias"}
    # What was frozen is exactly what the contrastive step leaves without a gradient.
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(1, 64, (2, 8))
    similarity = align.encode_image(pixels) @ align.encode_text(ids, torch.ones_like(ids)).T
    (similarity * align.get_logit_scale()).sum().backward()
    assert all((p.grad is None) == (n in frozen) for n, p in align.named_parameters())

    clip = clip_tiny(vocab_size=64, image_size=16)
    assert distributed.freeze_unused_contrastive_parameters(clip) is False
    assert all(p.requires_grad for p in clip.parameters())
    unknown = nn.Linear(2, 2)  # declares nothing: DDP must keep searching
    assert distributed.freeze_unused_contrastive_parameters(unknown) is True
    assert distributed.freeze_unused_contrastive_parameters(clip, True) is True
    with pytest.raises(ConfigError, match="distributed.find_unused_parameters"):
        distributed.freeze_unused_contrastive_parameters(clip, "sometimes")


def test_cast_frozen_parameters_touches_only_frozen_floating_weights():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    before = model[0].weight.detach().clone()
    changed = distributed.cast_frozen_parameters(model, torch.bfloat16)
    assert changed == 3 * 4 + 4
    assert model[0].weight.dtype == model[0].bias.dtype == torch.bfloat16
    assert model[1].weight.dtype == torch.float32 and model[1].weight.requires_grad
    assert torch.equal(model[0].weight, before.to(torch.bfloat16))  # the rounding FSDP's bf16 gather would apply
    assert distributed.cast_frozen_parameters(model, torch.bfloat16) == 0


def test_bf16_gradient_reduction_is_a_config_error_when_misspelled():
    with pytest.raises(ConfigError, match="distributed.reduce_dtype"):
        distributed.wrap_model(nn.Linear(2, 2), strategy="ddp", reduce_dtype="bf61")
