"""mmtrain.config.instantiate (allowlist, _partial_, _args_, nesting, one-line errors) and validate_components."""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf

from mmtrain.config import ConfigError, ValidationReport, instantiate, load, validate_components


def test_nested_partial_and_args():
    model = instantiate({"_target_": "torch.nn.Sequential",
                         "_args_": [{"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2},
                                    {"_target_": "torch.nn.ReLU"}]})
    assert isinstance(model, torch.nn.Sequential) and isinstance(model[0], torch.nn.Linear)
    assert model[0].weight.shape == (2, 3)
    factory = instantiate({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5})
    assert isinstance(factory, functools.partial)
    optimizer = factory(model.parameters())
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_extra_args_and_kwargs_reach_the_top_node():
    layer = instantiate(OmegaConf.create({"_target_": "torch.nn.Linear", "in_features": 3}), out_features=5,
                        bias=False)
    assert layer.weight.shape == (5, 3) and layer.bias is None


def test_none_gives_none():
    assert instantiate(None) is None


def test_target_not_allowed_names_key_and_flag(toy):
    cfg = load(toy.recipe, toy.config, [toy.out_override, "loss._target_=collections.OrderedDict"])
    with pytest.raises(ConfigError) as excinfo:
        instantiate(cfg.loss)
    message = str(excinfo.value)
    assert "\n" not in message and "toy.yaml" in message and "key 'loss._target_'" in message
    assert "not allowed" in message and "--allow-any-target" in message
    assert instantiate(cfg.loss, allow_any_target=True) == {}


def test_allowlist_is_recursive():
    node = {"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "os.getcwd"}]}
    with pytest.raises(ConfigError, match=r"key '_args_\.0\._target_': 'os\.getcwd' is not allowed"):
        instantiate(node)


def test_code_loading_torch_functions_are_denied():
    with pytest.raises(ConfigError, match=r"'torch\.hub\.load' is not allowed"):
        instantiate({"_target_": "torch.hub.load", "repo_or_dir": "x", "model": "y"})


def test_allow_any_target_setting_from_load(toy):
    cfg = load(toy.recipe, toy.config, [toy.out_override, "loss._target_=collections.OrderedDict"],
               allow_any_target=True)
    try:
        assert instantiate(cfg.loss) == {}
    finally:
        load(toy.recipe, toy.config, [toy.out_override])  # back to the default setting
    with pytest.raises(ConfigError, match="not allowed"):
        instantiate(cfg.loss)


@pytest.mark.parametrize("target, expected", [("torch.nn.Linearr", r"has no attribute 'Linearr'.*did you mean 'Linear'"),
                                              ("mmtrain.no_such_module.Thing", r"cannot import 'mmtrain\.no_such"),
                                              ("torch", r"not allowed")])
def test_target_not_importable(toy, target, expected):
    cfg = load(toy.recipe, toy.config, [toy.out_override, f"model._target_={target}"])
    with pytest.raises(ConfigError, match=expected) as excinfo:
        instantiate(cfg.model)
    assert "key 'model._target_'" in str(excinfo.value)


def test_bad_keyword_names_key_and_signature(toy):
    cfg = load(toy.recipe, toy.config, [toy.out_override, "+model.in_feature=3"])
    with pytest.raises(ConfigError) as excinfo:
        instantiate(cfg.model)
    message = str(excinfo.value)
    assert "key 'model.in_feature'" in message and "unexpected keyword argument 'in_feature'" in message
    assert "did you mean 'in_features'" in message
    assert "Linear(in_features, out_features, bias=True, device=None, dtype=None)" in message


def test_missing_argument_names_key_and_signature(toy):
    cfg = load(toy.recipe, toy.config, [toy.out_override, "~model.out_features"])
    with pytest.raises(ConfigError, match=r"key 'model': missing a required argument: 'out_features'; "
                                          r"signature: .*Linear\(in_features, out_features"):
        instantiate(cfg.model)


def test_bad_value_inside_builder(toy):
    cfg = load(toy.recipe, toy.config, [toy.out_override, "model.in_features=-3"])
    with pytest.raises(ConfigError, match=r"key 'model': calling torch\.nn\.modules\.linear\.Linear failed: RuntimeError.*; "
                                          r"signature: .*Linear\(in_features, out_features"):
        instantiate(cfg.model)


def test_partial_call_failure_names_key(toy):
    cfg = load(toy.recipe, toy.config, [toy.out_override, "optimizer.lr=-1"])
    factory = instantiate(cfg.optimizer)
    with pytest.raises(ConfigError, match=r"key 'optimizer': calling torch\.optim\.sgd\.SGD failed: ValueError: "
                                              r"Invalid learning rate: -1.*; signature: .*SGD\(params, lr=0\.001"):
        factory([torch.nn.Parameter(torch.zeros(1))])


def test_validation_report_api():
    report = ValidationReport()
    report.error("model.dim", "must be\n positive")
    report.info("note")
    assert [str(e) for e in report.errors] == ["key 'model.dim': must be; positive"]
    assert report.errors[0].key_path == "model.dim" and report.infos == ["note"] and not report.ok


def test_validate_builds_on_meta_and_counts_parameters(toy):
    cfg = load(toy.recipe, toy.config, [toy.out_override])
    seen = []
    report = validate_components(cfg, recipe_validate=lambda c, r: seen.append(c.max_steps))
    assert report.ok, report.errors
    assert "model: torch.nn.Linear: 10 parameters" in report.infos  # 4*2 weights + 2 biases
    assert seen == [2]


def test_validate_collects_every_problem(toy):
    cfg = load(toy.recipe, toy.config, [toy.out_override, "+model.bogus=1", "optimizer.lr=-1",
                                        "loss._target_=os.getcwd", "lr_scheduler._target_=torch.optim.nope"])

    def recipe_validate(cfg, report):
        report.error("max_steps", "recipe says no")

    report = validate_components(cfg, recipe_validate=recipe_validate)
    keys = sorted(e.key_path for e in report.errors)
    assert keys == ["loss._target_", "lr_scheduler._target_", "max_steps", "model.bogus", "optimizer"]


def test_validate_leaves_components_needing_recipe_inputs(toy):
    cfg = load(toy.recipe, toy.config, [toy.out_override, "+head._target_=torch.nn.Linear", "+head.out_features=2"])
    report = validate_components(cfg)
    assert report.ok, report.errors
    assert any(line.startswith("head: torch.nn.Linear: not built here: needs 'in_features'") for line in report.infos)
