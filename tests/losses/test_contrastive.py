"""Contrastive losses against float64 references written out element by element, tiled vs plain, and the
two-rank gloo run against the single-process global loss."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mmtrain.losses import AlignLoss, ClipLoss, SigLipLoss


def _embeds(n: int = 6, d: int = 5, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return image.requires_grad_(), text.requires_grad_()


def _reference_softmax_loss(image, text, scale, eps):
    """(CE_rows(image->text) + CE_rows(text->image)) / 2 with smoothed targets, written as sums."""
    n = image.shape[0]

    def ce(q, k):
        total = 0.0
        for i in range(n):
            logits = [scale * sum(q[i, t] * k[j, t] for t in range(q.shape[1])) for j in range(n)]
            m = max(logits)
            lse = m + torch.log(sum(torch.exp(x - m) for x in logits))
            target = [(1 - eps) * (1.0 if j == i else 0.0) + eps / n for j in range(n)]
            total = total + sum(-target[j] * (logits[j] - lse) for j in range(n))
        return total / n

    return (ce(image, text) + ce(text, image)) / 2


def _reference_siglip(image, text, scale, bias):
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * (image[i] * text[j]).sum() + bias
            total = total - torch.log(1 / (1 + torch.exp(-z * logit)))
    return total / n


@pytest.mark.parametrize("loss_cls,eps", [(AlignLoss, 0.1), (ClipLoss, 0.0)])
@pytest.mark.parametrize("tiled", [False, True])
def test_softmax_losses_match_reference_values_and_grads(loss_cls, eps, tiled):
    image, text = _embeds()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    loss = loss_cls(tiled=tiled, block_size=4)(image, text, scale)
    assert loss.ndim == 0 and loss_cls().label_smoothing == eps
    grads = torch.autograd.grad(loss, (image, text, scale))
    ref_image, ref_text = _embeds()
    ref_scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    ref = _reference_softmax_loss(ref_image, ref_text, ref_scale, eps)
    ref_grads = torch.autograd.grad(ref, (ref_image, ref_text, ref_scale))
    # float64 inputs: the loss computes in float64
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_align_loss_matches_model_formula():
    from mmtrain.models.align.model import align_loss

    image, text = _embeds(seed=3)
    logits_per_text = 4.0 * text @ image.t()
    torch.testing.assert_close(AlignLoss()(image, text, 4.0).double(), align_loss(logits_per_text).double(),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tiled", [False, True])
def test_siglip_matches_reference_and_owns_bias(tiled):
    image, text = _embeds(seed=1)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    loss_fn = SigLipLoss(tiled=tiled, block_size=4)
    assert loss_fn.logit_bias.item() == -10.0
    loss = loss_fn(image, text, scale)  # logit_bias=None: the loss's own learnable bias
    grads = torch.autograd.grad(loss, (image, text, scale, loss_fn.logit_bias))
    ref_image, ref_text = _embeds(seed=1)
    ref_scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    ref_bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    ref = _reference_siglip(ref_image, ref_text, ref_scale, ref_bias)
    ref_grads = torch.autograd.grad(ref, (ref_image, ref_text, ref_scale, ref_bias))
    # the own bias is a float32 parameter, so its gradient comes back in float32
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)
    # an explicit bias from the model replaces the loss's own
    explicit = SigLipLoss()(image, text, scale, torch.tensor(-3.0))
    torch.testing.assert_close(explicit.double(), _reference_siglip(image, text, scale, -3.0), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("make", [lambda: AlignLoss(tiled=True, block_size=7), lambda: ClipLoss(tiled=True, block_size=7),
                                  lambda: SigLipLoss(tiled=True, block_size=7)])
def test_tiled_equals_plain_in_float32(make):
    g = torch.Generator().manual_seed(5)
    image = torch.nn.functional.normalize(torch.randn(33, 16, generator=g), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(33, 16, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(20.0, requires_grad=True)
    tiled = make()
    plain = make()
    plain.tiled = False
    a = tiled(image, text, scale)
    ga = torch.autograd.grad(a, (image, text, scale))
    b = plain(image, text, scale)
    gb = torch.autograd.grad(b, (image, text, scale))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_errors():
    image, text = _embeds()
    with pytest.raises(ValueError, match="both be"):
        AlignLoss()(image, text[:3], 1.0)
    with pytest.raises(ValueError, match="logit_bias"):
        ClipLoss()(image, text, 1.0, torch.tensor(0.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        AlignLoss(label_smoothing=1.5)


# ---- two ranks (gloo) vs one process ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    g = torch.Generator().manual_seed(11)
    image = torch.nn.functional.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)
    return image, text


def _make_losses():
    return {"align": AlignLoss(), "clip": ClipLoss(), "siglip": SigLipLoss(),
            "align_tiled": AlignLoss(tiled=True, block_size=3), "siglip_tiled": SigLipLoss(tiled=True, block_size=3)}


def _rank_worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        image, text = _global_batch()
        local = slice(rank * 4, rank * 4 + 4)
        out = {}
        for name, loss_fn in _make_losses().items():
            for autocast in (False, True):
                # with autocast: float32 inputs, forward in CPU bf16 autocast, backward outside it (the recipe's way)
                dtype = torch.float32 if autocast else torch.float64
                img = image[local].to(dtype).requires_grad_()
                txt = text[local].to(dtype).requires_grad_()
                scale = torch.tensor(5.0, dtype=dtype, requires_grad=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = loss_fn(img, txt, scale)
                loss.backward()
                # DDP averages gradients over ranks; the embeddings' grads are this rank's rows of the global grad / W
                out[name + ("@bf16" if autocast else "")] = (
                    loss.item(), img.grad.double(), txt.grad.double(), scale.grad.double())
        results[rank] = out
    finally:
        dist.destroy_process_group()
    # skip interpreter finalization, where a gloo thread still releasing the last collective can abort the rank
    # (see mmtrain.config._entry.exit_with)
    os._exit(0)


def test_two_rank_gather_equals_global_loss():
    image, text = _global_batch()
    expected = {}
    for name, loss_fn in _make_losses().items():
        img, txt = image.clone().requires_grad_(), text.clone().requires_grad_()
        scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
        loss = loss_fn(img, txt, scale)
        loss.backward()
        expected[name] = (loss.item(), img.grad, txt.grad, scale.grad)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank_worker, args=(2, _free_port(), results), nprocs=2, start_method="spawn", join=True)
        results = dict(results)
    for name, (loss, img_grad, txt_grad, scale_grad) in expected.items():
        # float64 all the way, then float32 under bf16 autocast (the losses compute in float32 there, gather included)
        for key, tol in ((name, 1e-10), (name + "@bf16", 1e-5)):
            per_rank = [results[r][key] for r in range(2)]
            assert math.isclose(sum(r[0] for r in per_rank) / 2, loss, rel_tol=tol), key
            # the mean of the rank losses differentiates to the global gradient: ranks' rows, halved
            torch.testing.assert_close(torch.cat([r[1] for r in per_rank]) / 2, img_grad, atol=tol, rtol=tol)
            torch.testing.assert_close(torch.cat([r[2] for r in per_rank]) / 2, txt_grad, atol=tol, rtol=tol)
            torch.testing.assert_close(sum(r[3] for r in per_rank) / 2, scale_grad, atol=tol, rtol=tol)


# ---- SigLIP's own bias: only when asked for ---------------------------------------------------------------------

def test_siglip_own_bias_only_when_asked_for():
    image, text = _embeds(seed=2)
    without = SigLipLoss(init_logit_bias=None)
    assert without.logit_bias is None and list(without.parameters()) == []
    torch.testing.assert_close(without(image, text, 10.0, torch.tensor(-3.0)).double(),
                               _reference_siglip(image, text, 10.0, -3.0), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="no logit bias of its own"):
        without(image, text, 10.0)
    without.check_logit_bias(torch.tensor(-10.0))
    with pytest.raises(ValueError, match="no logit bias of its own"):
        without.check_logit_bias(None)
    # SigLipLoss() keeps its learnable bias for a model without one; next to a model's bias it would be dead weight
    own = SigLipLoss()
    assert [name for name, _ in own.named_parameters()] == ["logit_bias"]
    own.check_logit_bias(None)
    with pytest.raises(ValueError, match="never be used"):
        own.check_logit_bias(torch.tensor(-10.0))


def test_shipped_siglip_config_leaves_no_trainable_parameter_without_gradient():
    """The recipe puts model and loss in one module under DDP, which (find_unused_parameters=False, what a dual
    encoder gets) fails at step 2 on any trainable parameter that got no gradient in step 1."""
    from mmtrain.config import instantiate, load

    cfg = load("contrastive", "clip_tiny", ["loss=siglip", "model.siglip=true"])
    torch.manual_seed(0)
    model, loss_fn = instantiate(cfg.model), instantiate(cfg.loss)
    assert model.get_logit_bias() is not None
    loss_fn.check_logit_bias(model.get_logit_bias())
    task = torch.nn.ModuleDict({"model": model, "loss": loss_fn})
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 72, (4, 16), generator=gen)
    mask = torch.ones_like(ids)
    image = model.encode_image(torch.randn(4, 3, int(cfg.model.image_size), int(cfg.model.image_size), generator=gen))
    loss = loss_fn(image, model.encode_text(ids, mask), model.get_logit_scale(), model.get_logit_bias())
    loss.backward()
    no_grad = [name for name, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []

    cfg = load("contrastive", "siglip_vit_b16")
    with torch.device("meta"):
        model = instantiate(cfg.model)
    loss_fn = instantiate(cfg.loss)
    assert list(loss_fn.parameters()) == []
    loss_fn.check_logit_bias(model.get_logit_bias())
