"""Contrastive losses under bf16 autocast (forward inside, backward outside, as the contrastive recipe runs them)
against float64 references written out plainly, and float64 gradcheck of every loss and path.

The confident cases (positives well separated, loss near 0) are where a loss that mixes precisions fails: the loss
is a small difference of large logits, so rounding the logits to bf16 leaves only noise.
"""

from __future__ import annotations

import pytest
import torch

from mmtrain.losses import AlignLoss, ClipLoss, SigLipLoss, tiled_row_reduce


def _pairs(n: int, d: int, pos_sim: float, seed: int = 1):
    """float32 unit vectors; text_i has cosine about ``pos_sim`` with image_i and about 0 with the others."""
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = torch.nn.functional.normalize(pos_sim * image + (1 - pos_sim**2) ** 0.5 * noise, dim=-1)
    return image, text


def _reference_softmax(image, text, scale, eps):
    """float64: mean of the two directions' row cross-entropies with smoothed one-hot targets."""
    image, text = image.double(), text.double()
    n = image.shape[0]
    target = (1 - eps) * torch.eye(n, dtype=torch.float64, device=image.device) + eps / n

    def ce(logits):
        m = logits.max(dim=1, keepdim=True).values
        log_p = logits - m - torch.log(torch.exp(logits - m).sum(dim=1, keepdim=True))
        return -(target * log_p).sum(dim=1).mean()

    logits = scale * image @ text.t()
    return (ce(logits) + ce(logits.t())) / 2


def _reference_siglip(image, text, scale, bias):
    """float64: -sum_ij log sigmoid(z_ij * logit_ij) / n = sum_ij log(1 + exp(-z_ij * logit_ij)) / n."""
    image, text = image.double(), text.double()
    n = image.shape[0]
    z = 2 * torch.eye(n, dtype=torch.float64, device=image.device) - 1
    logits = scale * image @ text.t() + bias
    return torch.log1p(torch.exp(-z * logits)).sum() / n


def _under_autocast(loss_fn, image, text, *scalars):
    """Loss and d loss / d image, with the forward in bf16 autocast and the backward after leaving it."""
    image = image.clone().requires_grad_()
    with torch.autocast(image.device.type, dtype=torch.bfloat16):
        loss = loss_fn(image, text, *scalars)
    (grad,) = torch.autograd.grad(loss, image)
    return loss.double(), grad.double()


def _reference_grad(reference, image, text, *scalars):
    image = image.double().requires_grad_()
    loss = reference(image, text.double(), *scalars)
    (grad,) = torch.autograd.grad(loss, image)
    return loss, grad


def _rel(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("loss_cls,eps", [(ClipLoss, 0.0), (AlignLoss, 0.1)])
@pytest.mark.parametrize("pos_sim", [0.15, 0.3])
def test_softmax_losses_under_bf16_autocast_match_float64(loss_cls, eps, pos_sim):
    # D = 512 and scale 100: at pos_sim 0.3 CLIP's float64 loss is 1.7e-5 (every positive the row's maximum by far)
    image, text = _pairs(128, 512, pos_sim)
    scale = torch.tensor(100.0)
    want_loss, want_grad = _reference_grad(lambda i, t, s: _reference_softmax(i, t, s, eps), image, text, 100.0)
    errors = {}
    for tiled in (False, True):
        loss, grad = _under_autocast(loss_cls(tiled=tiled, block_size=48), image, text, scale)
        errors[tiled] = (abs(loss.item() - want_loss.item()) / want_loss.item(), _rel(grad, want_grad))
    # float32 logits of size ~30 leave ~1e-5 absolute error in a loss of 1.7e-5: relative 1e-3 is the float32
    # level here (1e-6 elsewhere). bf16 logits gave 2e-2 (plain) and a gradient pointing elsewhere (tiled).
    for tiled, (loss_err, grad_err) in errors.items():
        assert loss_err < 5e-3 and grad_err < 2e-3, (tiled, errors)
    # the tiled loss (its own backward) is as accurate as the plain one (autograd through one logit matrix)
    assert errors[True][1] < 3 * errors[False][1] + 1e-6, errors


@pytest.mark.parametrize("pos_sim", [0.3, 0.5, 0.6])
@pytest.mark.parametrize("tiled", [False, True])
def test_siglip_under_bf16_autocast_matches_float64(pos_sim, tiled):
    # scale 30, bias -10: at pos_sim 0.5 and 0.6 the positives are confident (float64 loss 0.024 and 0.014)
    image, text = _pairs(128, 512, pos_sim)
    scale, bias = torch.tensor(30.0), torch.tensor(-10.0)
    want_loss, want_grad = _reference_grad(_reference_siglip, image, text, 30.0, -10.0)
    loss, grad = _under_autocast(SigLipLoss(tiled=tiled, block_size=48), image, text, scale, bias)
    assert abs(loss.item() - want_loss.item()) / want_loss.item() < 1e-5
    assert _rel(grad, want_grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_under_cuda_bf16_autocast_match_float64():
    """The recipe's GPU path: CUDA bf16 autocast around the forward, backward outside it."""
    cases = [(ClipLoss, 0.3, (torch.tensor(100.0, device="cuda"),),
              lambda i, t: _reference_softmax(i, t, 100.0, 0.0), 5e-3, 2e-3),
             (AlignLoss, 0.3, (torch.tensor(100.0, device="cuda"),),
              lambda i, t: _reference_softmax(i, t, 100.0, 0.1), 1e-5, 1e-5),
             (SigLipLoss, 0.5, (torch.tensor(30.0, device="cuda"), torch.tensor(-10.0, device="cuda")),
              lambda i, t: _reference_siglip(i, t, 30.0, -10.0), 1e-5, 1e-5)]
    for loss_cls, pos_sim, scalars, reference, loss_tol, grad_tol in cases:
        image, text = (x.cuda() for x in _pairs(512, 512, pos_sim))
        want_loss, want_grad = _reference_grad(reference, image, text)
        for tiled in (False, True):
            loss, grad = _under_autocast(loss_cls(tiled=tiled, block_size=128), image, text, *scalars)
            assert abs(loss.item() - want_loss.item()) / want_loss.item() < loss_tol, (loss_cls, tiled)
            assert _rel(grad, want_grad) < grad_tol, (loss_cls, tiled, _rel(grad, want_grad))


def test_tiled_row_reduce_ignores_ambient_autocast_and_upcasts_bf16_leaves():
    image, text = _pairs(40, 16, 0.5)
    scale = torch.tensor(50.0)
    want = tiled_row_reduce(image.double(), text.double(), scale.double(), None, "logsumexp", 7, positive_offset=0)
    a = image.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiled_row_reduce(a, text.bfloat16(), scale, None, "logsumexp", 7, positive_offset=0)
    assert got.dtype == torch.float32
    # the inputs were rounded to bf16 (the caller's choice); the reduction over them is float32
    exact = tiled_row_reduce(a.detach().double(), text.bfloat16().double(), scale.double(), None, "logsumexp", 7,
                             positive_offset=0)
    torch.testing.assert_close(got.double(), exact, atol=1e-6, rtol=1e-5)
    assert (got.double() - want).abs().max() < 0.1
    got.sum().backward()
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad).all()


def _gradcheck_inputs(n=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(3.0, dtype=torch.float64)
    bias = torch.tensor(-1.5, dtype=torch.float64)
    return [x.requires_grad_() for x in (image, text, scale, bias)]


@pytest.mark.parametrize("make", [
    lambda: ClipLoss(), lambda: ClipLoss(tiled=True, block_size=3),
    lambda: AlignLoss(), lambda: AlignLoss(tiled=True, block_size=3),
], ids=["clip", "clip_tiled", "align", "align_tiled"])
def test_softmax_losses_pass_float64_gradcheck(make):
    image, text, scale, _ = _gradcheck_inputs()
    loss_fn = make()
    assert loss_fn(image, text, scale).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda i, t, s: loss_fn(i, t, s), (image, text, scale))


@pytest.mark.parametrize("tiled", [False, True])
def test_siglip_passes_float64_gradcheck(tiled):
    image, text, scale, bias = _gradcheck_inputs()
    loss_fn = SigLipLoss(tiled=tiled, block_size=3, init_logit_bias=None)
    assert loss_fn(image, text, scale, bias).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda i, t, s, b: loss_fn(i, t, s, b), (image, text, scale, bias))
    # and with the loss's own bias, in float64 too
    own = SigLipLoss(tiled=tiled, block_size=3).double()
    assert torch.autograd.gradcheck(lambda i, t, s, b: own(i, t, s), (image, text, scale, own.logit_bias))


@pytest.mark.parametrize("kind", ["logsumexp", "softplus"])
@pytest.mark.parametrize("offset", [None, 0, 2])
def test_tiled_row_reduce_float64_gradcheck_and_reference(kind, offset):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    logits = scale * a @ b.t() + bias
    if kind == "logsumexp":
        want = torch.log(torch.exp(logits).sum(dim=1))
        if offset is not None:
            want = want - logits[torch.arange(4), torch.arange(4) + offset]
    else:
        z = -torch.ones(4, 6, dtype=torch.float64)
        if offset is not None:
            z[torch.arange(4), torch.arange(4) + offset] = 1.0
        want = torch.log1p(torch.exp(-z * logits)).sum(dim=1)
    got = tiled_row_reduce(a, b, scale, bias, kind, 4, positive_offset=offset)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda *x: tiled_row_reduce(*x, kind, 4, positive_offset=offset),
                                    (a, b, scale, bias))
