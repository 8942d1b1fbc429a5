"""Registry, build_attention from dicts / dataclasses / the YAML group, errors, and MultiHeadAttention with every
mechanism."""

import dataclasses
import pathlib
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from mmtrain.errors import ConfigError
from mmtrain.modules.attention import (
    ATTENTION_REGISTRY,
    Attention,
    AttentionConfig,
    FavorAttention,
    GlobalAttention,
    LinformerAttention,
    LocalAttention,
    MultiHeadAttention,
    NystromAttention,
    OrthoFormerAttention,
    RandomAttention,
    ScaledDotProduct,
    build_attention,
    register_attention,
)

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[3] / "configs" / "model" / "attention"
EXPECTED = {
    "scaled_dot_product": ScaledDotProduct,
    "local": LocalAttention,
    "linformer": LinformerAttention,
    "nystrom": NystromAttention,
    "random": RandomAttention,
    "orthoformer": OrthoFormerAttention,
    "global": GlobalAttention,
    "favor": FavorAttention,
}
WRAPPER_DEFAULTS = {"dropout": 0.0, "causal": False, "num_heads": 2, "dim_head": 8, "dim_model": 16, "seq_len": 32}


def test_registry_names_are_xformers_names():
    for name, cls in EXPECTED.items():
        assert ATTENTION_REGISTRY[name].constructor is cls


def test_build_from_dict_dataclass_and_dictconfig():
    local = build_attention({"name": "local", "window_size": 7, "causal": True})
    assert isinstance(local, LocalAttention) and local.window_size == 7 and local.causal

    @dataclasses.dataclass
    class NystromConfig(AttentionConfig):
        num_landmarks: int = 8
        num_heads: int = 2

    nystrom = build_attention(NystromConfig(name="nystrom", dropout=0.1))
    assert nystrom.num_landmarks == 8 and nystrom.dropout == 0.1
    favor = build_attention(OmegaConf.create({"name": "favor", "dim_features": 12}), dim_head=8)
    assert favor.dim_features == 12 and favor.feature_map.features.shape == (8, 6)


def test_config_values_override_wrapper_defaults_and_unused_defaults_are_ignored():
    built = build_attention({"name": "linformer", "seq_len": 20}, **WRAPPER_DEFAULTS)
    assert built.seq_len == 20 and built.k == 5
    assert build_attention({"name": "orthoformer"}, **WRAPPER_DEFAULTS).num_landmarks == 32


@pytest.mark.parametrize("config,message", [
    ({"name": "local", "window_size": 4}, "attention 'local': window_size=4 is even"),
    ({"name": "local", "windw_size": 5}, "LocalAttention has no argument 'windw_size'"),
    ({"name": "favor", "feature_map_type": "sm_xyz"}, "feature_map_type 'sm_xyz' is not one of"),
    ({"name": "linformer", "causal": True}, "cannot be causal"),
    ({"name": "flash"}, "unknown attention 'flash'; registered: favor, global"),
    ({"window_size": 3}, "needs a 'name'"),
])
def test_config_mistakes_are_one_line_config_errors(config, message):
    with pytest.raises(ConfigError) as caught:
        build_attention(config, dim_head=8, seq_len=16)
    assert isinstance(caught.value, ValueError)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_mechanism_from_users_own_module_is_selectable(tmp_path, monkeypatch):
    (tmp_path / "my_attention_module.py").write_text(textwrap.dedent("""
        from mmtrain.modules.attention import Attention, register_attention

        @register_attention("doubled_values")
        class DoubledValues(Attention):
            def __init__(self, dropout=0.0, factor=2.0, **kwargs):
                super().__init__(dropout)
                self.factor = factor

            def forward(self, q, k, v, *args, **kwargs):
                return self.factor * v
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        built = build_attention({"name": "doubled_values", "module": "my_attention_module", "factor": 3.0})
        assert built.factor == 3.0
        with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
            build_attention({"name": "other_name", "module": "no_such_module"})
        with pytest.raises(ValueError, match="already registered"):
            register_attention("doubled_values")(type("Other", (Attention,), {}))
    finally:
        ATTENTION_REGISTRY.pop("doubled_values", None)
        sys.modules.pop("my_attention_module", None)


def test_fields_of_a_registered_config_reach_a_mechanism_taking_kwargs():
    """xFormers' pattern: options declared in the registered config dataclass, taken through **kwargs."""

    @dataclasses.dataclass
    class TemperatureConfig(AttentionConfig):
        temperature: float | None = None

    class Tempered(Attention):
        def __init__(self, dropout=0.0, *args, **kwargs):
            super().__init__(dropout)
            self.temperature = kwargs.get("temperature") or 1.0

    register_attention("audit_tempered", TemperatureConfig)(Tempered)
    try:
        assert build_attention({"name": "audit_tempered", "temperature": 2.0}).temperature == 2.0
        assert build_attention(TemperatureConfig(name="audit_tempered", temperature=3.0)).temperature == 3.0
        with pytest.raises(ConfigError, match="has no argument 'temprature'"):
            build_attention({"name": "audit_tempered", "temprature": 2.0})
    finally:
        ATTENTION_REGISTRY.pop("audit_tempered", None)


def test_every_mechanism_has_a_yaml_file_with_the_page_defaults():
    files = {path.stem: OmegaConf.to_container(OmegaConf.load(path)) for path in CONFIG_DIR.glob("*.yaml")}
    assert set(files) == set(EXPECTED)
    for stem, config in files.items():
        assert config["name"] == stem
        assert "causal" not in config and "dropout" not in config  # those come from the model
        built = build_attention(config, **WRAPPER_DEFAULTS)
        assert type(built) is EXPECTED[stem]
    assert files["local"]["window_size"] == 5
    assert files["random"]["r"] == 0.01 and files["random"]["constant_masking"] is True
    assert files["nystrom"]["num_landmarks"] == 64 and files["nystrom"]["inv_iterations"] == 6
    assert files["orthoformer"]["num_landmarks"] == 32 and files["orthoformer"]["landmark_selection"] == "orthogonal"
    assert files["favor"]["feature_map_type"] == "sm_reg"


def test_hydra_group_places_the_file_at_model_attention():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR.parents[1]), version_base=None):
        cfg = compose(overrides=["+model/attention=nystrom", "model.attention.num_landmarks=16"])
    assert cfg.model.attention.name == "nystrom" and cfg.model.attention.num_landmarks == 16
    mha = MultiHeadAttention(embed_dim=16, num_heads=2, attention=cfg.model.attention)
    assert isinstance(mha.attention, NystromAttention) and mha.attention.num_landmarks == 16


MECHANISM_CONFIGS = [
    {"name": "scaled_dot_product"},
    {"name": "local", "window_size": 3},
    {"name": "linformer"},
    {"name": "nystrom", "num_landmarks": 4, "conv_kernel_size": 3},
    {"name": "random", "r": 0.2},
    {"name": "orthoformer", "num_landmarks": 4},
    {"name": "global", "attention_query_mask": 1},
    {"name": "favor"},
]


@pytest.mark.parametrize("config", MECHANISM_CONFIGS, ids=lambda c: c["name"])
def test_multi_head_attention_with_each_mechanism(config):
    torch.manual_seed(0)
    mha = MultiHeadAttention(embed_dim=16, num_heads=2, num_kv_heads=1, max_seq_len=12, attention=dict(config))
    x = torch.randn(2, 12, 16, requires_grad=True)
    key_padding = torch.ones(2, 12, dtype=torch.bool)
    key_padding[1, 9:] = False
    out = mha(x, key_padding_mask=key_padding)
    assert out.shape == (2, 12, 16) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, parameter in mha.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Padded key positions do not change unpadded outputs of the exact mechanisms.
    if config["name"] in ("scaled_dot_product", "local", "random", "global", "favor"):
        changed = x.detach().clone()
        changed[1, 9:] += 5.0
        torch.testing.assert_close(mha(changed, key_padding_mask=key_padding)[:, :9],
                                   mha(x.detach(), key_padding_mask=key_padding)[:, :9])


@pytest.mark.parametrize("name", ["scaled_dot_product", "local", "random", "global", "favor", "nystrom"])
def test_causal_mechanisms_in_a_causal_wrapper_ignore_the_future(name):
    torch.manual_seed(0)
    extra = {"num_landmarks": 3} if name == "nystrom" else {}  # fewer landmarks than tokens: the approximation
    mha = MultiHeadAttention(embed_dim=16, num_heads=2, is_causal=True, max_seq_len=10,
                             attention={"name": name, **extra})
    assert mha.attention.causal
    x = torch.randn(1, 10, 16)
    changed = x.clone()
    changed[:, 6:] = torch.randn(1, 4, 16)
    torch.testing.assert_close(mha(x)[:, :6], mha(changed)[:, :6])


@pytest.mark.parametrize("name", ["linformer", "orthoformer"])
def test_non_causal_mechanisms_refuse_a_causal_model(name):
    with pytest.raises(ConfigError, match="cannot be causal"):
        MultiHeadAttention(embed_dim=16, num_heads=2, is_causal=True, attention={"name": name})


@pytest.mark.parametrize("config", [{"name": "local", "window_size": 3}, {"name": "random", "r": 0.3},
                                    {"name": "global", "attention_query_mask": 2}, {"name": "favor"},
                                    {"name": "scaled_dot_product"}], ids=lambda c: c["name"])
def test_decoding_with_a_kv_cache_matches_the_full_causal_pass(config):
    """One token at a time through the cache: the causal band is aligned bottom-right (query = newest position)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(embed_dim=16, num_heads=2, is_causal=True, max_seq_len=8, attention=dict(config))
    mha.eval()
    x = torch.randn(1, 8, 16)
    full = mha(x)
    mha.setup_cache(batch_size=1, dtype=torch.float32, max_seq_len=8)
    prefix = mha(x[:, :3])
    steps = [mha(x[:, i:i + 1]) for i in range(3, 8)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full)
