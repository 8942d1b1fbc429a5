"""mmtrain.config.load: Hydra composition, the override grammar, search path, and one-line ConfigErrors."""

from __future__ import annotations

import shutil

import pytest
from omegaconf import DictConfig, OmegaConf

from mmtrain.config import ConfigError, load
from mmtrain.errors import UserError


def _load(toy, *overrides, config=None):
    return load(toy.recipe, config or toy.config, [toy.out_override, *overrides])


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_config_error_is_reexported_user_error():
    assert ConfigError.__module__ == "mmtrain.errors" and issubclass(ConfigError, UserError)


def test_composes_absolute_defaults_and_self(toy):
    cfg = _load(toy)
    assert isinstance(cfg, DictConfig)
    assert cfg.model == {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 2}
    assert cfg.output_dir == str(toy.out) and cfg.max_steps == 2 and cfg.checkpoint.every_n_steps == 1
    assert "hydra" not in cfg


def test_override_grammar(toy):
    cfg = _load(toy, "model.out_features=3", "+model.bias=false", "++seed=7", "++new_key=1", "~checkpoint",
                "optimizer.lr=1e-3", "+extra.shape=[1,2,3]", "+extra.mapping={a: 1, b: [x, y]}",
                "resume=/some/checkpoint")
    assert cfg.model.out_features == 3 and cfg.model.bias is False
    assert cfg.seed == 7 and cfg.new_key == 1 and "checkpoint" not in cfg
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert OmegaConf.to_container(cfg.extra) == {"shape": [1, 2, 3], "mapping": {"a": 1, "b": ["x", "y"]}}
    assert cfg.resume == "/some/checkpoint"


def test_group_swap_and_relative_defaults(toy):
    cfg = _load(toy, "model=toy_attn")
    assert cfg.model.attention == {"name": "scaled_dot_product"}
    cfg = _load(toy, "model=toy_attn", "model/attention=local")
    assert cfg.model.attention == {"name": "local", "window_size": 3}
    assert cfg.model._target_ == "torch.nn.Identity"


def test_int_into_float_key_is_accepted(toy):
    assert _load(toy, "optimizer.lr=1").optimizer.lr == 1


def test_builtin_name_lookup_recipe_folder_then_top(builtin_tree, tmp_path):
    cfg = load("toy", "toy", [f"output_dir={tmp_path}"])
    assert cfg.model.in_features == 4
    (builtin_tree.configs / "shared.yaml").write_text("output_dir: x\nvalue: 1\n")
    assert load("toy", "shared").value == 1
    # a recipe given by path uses its stem to find configs/<stem>/
    assert load(builtin_tree.recipes / "toy.py", "toy", [f"output_dir={tmp_path}"]).seed == 0


def test_copied_config_keeps_builtin_groups(builtin_tree, tmp_path):
    mine = tmp_path / "elsewhere" / "mine.yaml"
    mine.parent.mkdir()
    shutil.copy(builtin_tree.configs / "toy" / "toy.yaml", mine)
    cfg = load("toy", str(mine), [f"output_dir={tmp_path}", "model=toy_attn", "model/attention=local"])
    assert cfg.model.attention.window_size == 3
    # the config's own folder comes first: a local group option shadows the built-in one
    (mine.parent / "model").mkdir()
    (mine.parent / "model" / "toy_linear.yaml").write_text("_target_: torch.nn.Linear\nin_features: 9\n"
                                                          "out_features: 1\n")
    assert load("toy", str(mine), [f"output_dir={tmp_path}"]).model.in_features == 9


def test_allow_any_target_flag_is_stored(toy):
    from mmtrain.config import allow_any_target

    load(toy.recipe, toy.config, [toy.out_override], allow_any_target=True)
    assert allow_any_target() is True
    load(toy.recipe, toy.config, [toy.out_override])
    assert allow_any_target() is False


# ------------------------------------------------------------------------------------------- error cases


def test_yaml_syntax_error_names_file_and_line(toy):
    toy.config.write_text("seed: 0\nmax_steps: [1, 2\noutput_dir: x\n")
    with pytest.raises(ConfigError) as excinfo:
        _load(toy)
    message = _one_line_error(excinfo)
    assert "toy.yaml:" in message and "line 3" in message and "YAML syntax error" in message


def test_yaml_syntax_error_in_group_file(toy):
    (toy.configs / "model" / "broken.yaml").write_text("in_features: {a: 1\n")
    with pytest.raises(ConfigError) as excinfo:
        _load(toy, "model=broken")
    message = _one_line_error(excinfo)
    assert "broken.yaml" in message and "line 2" in message


def test_empty_yaml(toy):
    toy.config.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"toy\.yaml: the config file is empty"):
        _load(toy)


@pytest.mark.parametrize("content, kind", [("- 1\n- 2\n", "list"), ("just text\n", "str")])
def test_non_mapping_yaml(toy, content, kind):
    toy.config.write_text(content)
    with pytest.raises(ConfigError, match=rf"toy\.yaml: expected a mapping.*got a {kind}"):
        _load(toy)


def test_non_mapping_group_file(toy):
    (toy.configs / "model" / "listy.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"model/listy\.yaml: expected a mapping"):
        _load(toy, "model=listy")


def test_unknown_config_name_suggests(builtin_tree):
    with pytest.raises(ConfigError) as excinfo:
        load("toy", "toyy")
    message = _one_line_error(excinfo)
    assert "unknown config 'toyy'" in message and "did you mean 'toy'" in message


def test_unknown_recipe_suggests(builtin_tree):
    with pytest.raises(ConfigError, match=r"unknown recipe 'tooy'.*did you mean 'toy'"):
        load("tooy", "toy")


def test_missing_file(toy):
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: config file not found"):
        load(toy.recipe, str(toy.root / "nowhere.yaml"))


def test_override_of_missing_key_suggests_and_mentions_plus(toy):
    with pytest.raises(ConfigError) as excinfo:
        _load(toy, "optimizer.lrr=0.1")
    message = _one_line_error(excinfo)
    assert "'optimizer.lrr'" in message and "did you mean 'optimizer.lr'" in message
    assert "'+optimizer.lrr=0.1'" in message


def test_delete_of_missing_key(toy):
    with pytest.raises(ConfigError, match=r"'~model\.in_feature'.*did you mean 'model\.in_features'"):
        _load(toy, "~model.in_feature")


def test_add_of_existing_key(toy):
    with pytest.raises(ConfigError, match=r"key 'seed' already exists.*'\+\+seed=VALUE'"):
        _load(toy, "+seed=1")


@pytest.mark.parametrize("override, key", [("seed=abc", "seed"), ("max_steps=1.5", "max_steps"),
                                           ("checkpoint=3", "checkpoint"), ("model.in_features=[1]", "model.in_features")])
def test_type_mismatch(toy, override, key):
    with pytest.raises(ConfigError) as excinfo:
        _load(toy, override)
    message = _one_line_error(excinfo)
    assert f"type mismatch at key '{key}'" in message and f"'{override}'" in message


def test_unset_required_value(toy):
    with pytest.raises(ConfigError) as excinfo:
        load(toy.recipe, toy.config, [])
    message = _one_line_error(excinfo)
    assert "toy.yaml" in message and "'output_dir'" in message and "???" in message


def test_unknown_group_option_lists_options(toy):
    with pytest.raises(ConfigError, match=r"override 'model=toy_linearr'.*did you mean 'toy_linear'.*toy_attn"):
        _load(toy, "model=toy_linearr")


def test_unknown_option_in_defaults_list(toy):
    toy.config.write_text(toy.config.read_text().replace("/model: toy_linear", "/model: missing_model"))
    with pytest.raises(ConfigError, match=r"defaults list of 'toy': no config 'missing_model' in group 'model'"):
        _load(toy)


def test_group_not_in_defaults(toy):
    with pytest.raises(ConfigError, match=r"group 'model/attention' is not in the config's defaults list.*\+model"):
        _load(toy, "model/attention=local")


def test_unparsable_override(toy):
    with pytest.raises(ConfigError, match=r"override 'a=\[1': cannot parse"):
        _load(toy, "a=[1")


def test_unresolvable_interpolation(toy):
    with pytest.raises(ConfigError, match=r"key 'max_steps': cannot resolve interpolation"):
        _load(toy, "max_steps=${nope}")


def test_value_given_to_a_group(toy):
    with pytest.raises(ConfigError, match=r"override 'model=3': 'model' is a config group: give one of its options "
                                          r"\(.*toy_attn, toy_linear\)"):
        _load(toy, "model=3")
