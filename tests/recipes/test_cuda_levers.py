"""The GPU levers change speed, not results: on CUDA the contrastive recipe's defaults (host_sync=auto -> device-side
skip, normalize_on_device=auto -> uint8 from workers, sdpa_backend) train like the per-step, host-normalized path,
and a compiled CLIP step gives eager's losses within bf16 noise. Skipped without CUDA (run with ``pytest -m gpu``).
"""

import math

import pytest
import torch

from tests.recipes.test_contrastive import _events, _recipe, tiny_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_cfg(path, **overrides):
    return tiny_cfg(path, device="cuda", num_workers=2, **{"log.every_n_steps": 3, "checkpoint.every_n_steps": 100,
                                                           "eval.every_n_steps": 100, **overrides})


def _logged(path):
    return [(e["step"], e["loss"], e["grad_norm"]) for e in _events(path) if "loss" in e]


def test_auto_levers_on_cuda_train_like_the_per_step_host_path(tmp_path, monkeypatch):
    recipe = _recipe()
    chosen = []
    original = recipe.ContrastiveRecipe._device_skip
    monkeypatch.setattr(recipe.ContrastiveRecipe, "_device_skip",
                        lambda self: chosen.append(original(self)) or chosen[-1])
    recipe.main(_cuda_cfg(tmp_path / "auto"))
    recipe.main(_cuda_cfg(tmp_path / "host", host_sync="step", normalize_on_device=False))
    assert chosen == [True, False]  # auto picked the device-side skip on CUDA with fused AdamW
    auto, host = _logged(tmp_path / "auto"), _logged(tmp_path / "host")
    assert [s for s, _, _ in auto] == [3, 6] == [s for s, _, _ in host]
    for (_, loss_a, norm_a), (_, loss_h, norm_h) in zip(auto, host):
        assert math.isfinite(loss_a) and math.isclose(loss_a, loss_h, rel_tol=1e-3, abs_tol=1e-4)
        assert math.isclose(norm_a, norm_h, rel_tol=1e-2, abs_tol=1e-4)


def test_normalize_on_device_equals_worker_normalization():
    from mmtrain.data.transforms import ContrastiveImageTransform

    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    on_cpu = ContrastiveImageTransform(32, train=True)(image, "a cat", seed=7)
    unnormalized = ContrastiveImageTransform(32, train=True, normalize=False)
    raw = unnormalized(image, "a cat", seed=7)
    on_gpu = unnormalized.pixel_normalizer()(raw[None].cuda())[0]
    reference = (raw.double() / 255 - torch.tensor(unnormalized.mean, dtype=torch.float64)[:, None, None]) \
        / torch.tensor(unnormalized.std, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(on_gpu.double().cpu(), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(on_cpu.double(), reference, atol=1e-5, rtol=0)


def test_compiled_clip_step_gives_eager_losses_in_bf16():
    from mmtrain.losses import ClipLoss
    from mmtrain.models.clip._dual_builders import clip_tiny

    def losses(compiled):
        torch.manual_seed(0)
        model = clip_tiny(vocab_size=1000, image_size=32, context_length=16).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        loss_fn = ClipLoss()

        def step(pixels, ids):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                image = model.encode_image(pixels)
                text = model.encode_text(ids, torch.ones_like(ids))
                return loss_fn(image, text, model.get_logit_scale())

        step_fn = torch.compile(step) if compiled else step
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(5):
            pixels = torch.randn(16, 3, 32, 32, generator=g).cuda()
            ids = torch.randint(1, 1000, (16, 16), generator=g).cuda()
            loss = step_fn(pixels, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    eager, compiled = losses(False), losses(True)
    assert all(math.isfinite(v) for v in eager)
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 0.02 * abs(a) + 1e-3  # bf16 autocast: ~3 significant digits per op
