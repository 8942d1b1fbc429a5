"""The whole-step CUDA graph (``GraphedStep``, the contrastive recipe's ``cuda_graph``) changes speed, not results.

CPU: the setting is checked and refused where it cannot apply. CUDA (``pytest -m gpu``): a replayed AdamW step with a
moving learning rate matches AdamW written out in float64, a batch of other shapes runs eagerly, and the recipe
trains, evaluates and checkpoints under the graph with the eager losses.
"""

import math

import pytest
import torch

from mmtrain.config import ValidationReport
from mmtrain.errors import ConfigError
from mmtrain.training.cuda_graph import GraphedStep
from tests.recipes.test_contrastive import _events, _recipe, tiny_cfg


def test_graphed_step_needs_an_eager_warmup_step():
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        GraphedStep(lambda inputs: (), warmup_steps=0)


@pytest.mark.parametrize("value", ["yes", 1, "always"])
def test_recipe_and_validate_refuse_an_unknown_cuda_graph_setting(tmp_path, value):
    recipe = _recipe()
    cfg = tiny_cfg(tmp_path)
    cfg.cuda_graph = value
    report = ValidationReport()
    recipe.validate(cfg, report)
    assert [issue.key_path for issue in report.errors] == ["cuda_graph"]
    with pytest.raises(ConfigError, match="cuda_graph: expected auto, true or false"):
        recipe.main(cfg)


def test_cuda_graph_true_on_cpu_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="cuda_graph=true: it needs a CUDA device"):
        _recipe().main(tiny_cfg(tmp_path, cuda_graph=True))


def test_cuda_graph_auto_on_cpu_trains_eagerly(tmp_path, monkeypatch):
    recipe = _recipe()
    built = []
    monkeypatch.setattr(recipe, "GraphedStep", lambda *a, **k: built.append(a) or pytest.fail("graph on CPU"))
    recipe.main(tiny_cfg(tmp_path, max_steps=2, cuda_graph="auto"))
    assert built == []
    assert [e["step"] for e in _events(tmp_path) if "loss" in e] == [1, 2]


def _adamw_float64(w, xs, ys, lrs, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1):
    """AdamW on the least-squares loss mean((x w - y)^2), written out in float64."""
    w = w.double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, (x, y, lr) in enumerate(zip(xs, ys, lrs), start=1):
        x, y = x.double(), y.double()
        grad = 2.0 / y.numel() * x.T @ (x @ w - y)
        w = w * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        w = w - lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
    return w


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replayed_adamw_step_follows_the_schedule_and_matches_float64():
    torch.manual_seed(0)
    w0 = torch.randn(6, 3)
    weight = torch.nn.Parameter(w0.clone().cuda())
    optimizer = torch.optim.AdamW([weight], lr=0.05, weight_decay=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))  # moves every step

    def step(inputs):
        optimizer.zero_grad(set_to_none=True)
        loss = ((inputs["x"] @ weight - inputs["y"]) ** 2).mean()
        loss.backward()
        optimizer.step()
        return (loss.detach(),)

    graphed = GraphedStep(step, optimizer, warmup_steps=2)
    g = torch.Generator().manual_seed(1)
    rows = [16] * 7 + [10]  # the last batch has other shapes: it must run eagerly, not replay over 16 rows
    xs = [torch.randn(n, 6, generator=g) for n in rows]
    ys = [torch.randn(n, 3, generator=g) for n in rows]
    lrs, losses = [], []
    for x, y in zip(xs, ys):
        lrs.append(optimizer.param_groups[0]["lr"])
        losses.append(graphed({"x": x.cuda(), "y": y.cuda()})[0].item())
        scheduler.step()
    assert graphed.captured and graphed.replays == 5 and graphed.eager_steps == 3
    assert isinstance(optimizer.param_groups[0]["lr"], float)  # schedulers and checkpoints still see floats
    assert optimizer.param_groups[0]["capturable"] is False
    reference = _adamw_float64(w0, xs, ys, lrs)
    torch.testing.assert_close(weight.detach().double().cpu(), reference, atol=2e-5, rtol=1e-5)
    # the losses are those of the weights before each step
    w = w0.double()
    first_loss = ((xs[0].double() @ w - ys[0].double()) ** 2).mean().item()
    assert math.isclose(losses[0], first_loss, rel_tol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recipe_under_cuda_graph_trains_evaluates_and_checkpoints_like_eager(tmp_path, monkeypatch):
    recipe = _recipe()
    graphs = []
    real = recipe.GraphedStep
    monkeypatch.setattr(recipe, "GraphedStep", lambda *a, **k: graphs.append(real(*a, **k)) or graphs[-1])

    def cfg(name, graph):
        return tiny_cfg(tmp_path / name, device="cuda", num_workers=2, cuda_graph=graph, max_steps=9,
                        **{"log.every_n_steps": 3, "eval.every_n_steps": 4, "checkpoint.every_n_steps": 4})

    recipe.main(cfg("graph", True))
    recipe.main(cfg("eager", False))
    assert len(graphs) == 1 and graphs[0].captured and graphs[0].replays == 9 - 3  # steps 4 (captured, then replayed) to 9
    graph_events, eager_events = _events(tmp_path / "graph"), _events(tmp_path / "eager")
    logged = [[(e["step"], e["loss"], e["grad_norm"], e["lr"]) for e in events if "loss" in e]
              for events in (graph_events, eager_events)]
    assert [s for s, *_ in logged[0]] == [3, 6, 9] == [s for s, *_ in logged[1]]
    for (_, loss_g, norm_g, lr_g), (_, loss_e, norm_e, lr_e) in zip(*logged):
        assert math.isfinite(loss_g) and math.isclose(loss_g, loss_e, rel_tol=1e-3, abs_tol=1e-4)
        assert math.isclose(norm_g, norm_e, rel_tol=1e-2, abs_tol=1e-4)
        assert lr_g == lr_e
    assert sorted(p.name for p in (tmp_path / "graph" / "checkpoints").iterdir()) == ["step_00000008", "step_00000009"]
    evals = [[(e["step"], e["val/zero_shot_acc"]) for e in events if "val/zero_shot_acc" in e]
             for events in (graph_events, eager_events)]
    assert [s for s, _ in evals[0]] == [4, 8, 9] == [s for s, _ in evals[1]]


@pytest.mark.parametrize("compile_mode,expected", [(False, True), ("regional", True), ("whole", False)])
def test_cuda_graph_auto_covers_the_compile_modes_that_ran_graphed(tmp_path, monkeypatch, compile_mode, expected):
    """auto's decision once every hard condition holds (a CUDA device, one process...): whole-step compile stays
    eager unless cuda_graph=true. Decided without a GPU: the recipe's device is set by hand."""
    recipe = _recipe()
    r = recipe.ContrastiveRecipe(tiny_cfg(tmp_path, max_steps=1, compile=False, **{"optimizer.fused": False}))
    r.setup()
    r.cleanup()
    r.cfg.compile = compile_mode
    r.device = torch.device("cuda")
    assert r._use_cuda_graph(device_skip=True) is expected
    r.cfg.cuda_graph = True
    assert r._use_cuda_graph(device_skip=True) is True
    r.cfg.cuda_graph = "auto"
    assert r._use_cuda_graph(device_skip=False) is False  # host_sync=step: a sync every step
