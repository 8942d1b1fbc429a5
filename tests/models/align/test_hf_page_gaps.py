"""The ALIGN page's text-tower options: ``output_attentions``, ``head_mask``, relative position embeddings, the
``BaseModelOutputWithPoolingAndCrossAttentions`` return type, config-level output flags, and the hub-id error.

transformers 5.x (the installed test extra) dropped ``head_mask`` and the relative position types from every
model, so those two are checked against a float64 reference written below from HF 4.x's ``BertSelfAttention``
formula; attentions and config flags are checked against transformers' own ``AlignModel``/``AlignTextModel``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmtrain.errors import CheckpointError
from mmtrain.models.align import AlignConfig, AlignModel, AlignTextConfig, AlignTextModel, AlignVisionModel
from mmtrain.models.align.outputs import BaseModelOutputWithPoolingAndCrossAttentions
from tests.models.align.conftest import TINY_TEXT, tiny_config_dict

ATOL = 1e-5


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 99, (3, 9), generator=g)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 4:] = 0
    token_type_ids = torch.zeros(3, 9, dtype=torch.long)
    token_type_ids[0, 5:] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def _pixels(seed: int = 2) -> torch.Tensor:
    return torch.randn(3, 3, 33, 31, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def hf_checkpoint(tmp_path):
    """A tiny random transformers AlignModel saved with save_pretrained, loaded back by transformers (eager)."""
    from transformers import AlignConfig as HFAlignConfig
    from transformers import AlignModel as HFAlignModel

    torch.manual_seed(0)
    model = HFAlignModel(HFAlignConfig(**tiny_config_dict()))
    with torch.no_grad():  # freshly initialised batch norms pool to ~0; give the image embeddings a real scale
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.2, 0.2)
    model.save_pretrained(tmp_path)
    hf = HFAlignModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    return tmp_path, hf


# ---- (3) output_attentions ------------------------------------------------------------------------------------
def test_attentions_match_transformers(hf_checkpoint):
    path, hf = hf_checkpoint
    ours = AlignModel.from_pretrained(path).eval()
    inputs = _inputs()
    with torch.no_grad():
        a = ours(**inputs, pixel_values=_pixels(), output_attentions=True)
        b = hf(**inputs, pixel_values=_pixels(), output_attentions=True)
        fast = ours(**inputs, pixel_values=_pixels())
    attentions = a.text_model_output.attentions
    assert len(attentions) == TINY_TEXT["num_hidden_layers"]
    for mine, theirs in zip(attentions, b.text_model_output.attentions):
        assert mine.shape == (3, TINY_TEXT["num_attention_heads"], 9, 9)
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    # probabilities: rows sum to 1, padded keys get no weight
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(3, 4, 9))
    assert attentions[1][2, :, :, 4:].abs().max() == 0
    # the explicit path computes what the fused one does
    torch.testing.assert_close(a.logits_per_text, fast.logits_per_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.logits_per_text, b.logits_per_text, atol=ATOL, rtol=0)
    assert fast.text_model_output.attentions is None

    text = AlignTextModel.from_pretrained(path).eval()
    with torch.no_grad():
        mine = text(**inputs, output_attentions=True, return_dict=False)
        theirs = hf.text_model(**inputs, output_attentions=True, return_dict=False)
        features = ours.get_text_features(**inputs, output_attentions=True)
    assert len(mine) == len(theirs) == 3  # last_hidden_state, pooler_output, attentions
    for x, y in zip(mine[2], theirs[2]):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    torch.testing.assert_close(features, hf.get_text_features(**inputs).pooler_output, atol=ATOL, rtol=0)


def test_explicit_path_refuses_other_mechanisms(tiny_config):
    torch.manual_seed(0)
    text = AlignTextModel(AlignTextConfig(**TINY_TEXT), attention={"name": "local", "window_size": 3}).eval()
    inputs = _inputs()
    with torch.no_grad():
        assert text(**inputs).last_hidden_state.shape == (3, 9, 32)  # the fused path keeps working
    with pytest.raises(ValueError, match="'local'"):
        text(**inputs, output_attentions=True)
    with pytest.raises(ValueError, match="'local'"):
        text(**inputs, head_mask=torch.ones(4))
    with pytest.raises(ValueError, match="relative_key.*'local'"):
        AlignTextModel(AlignTextConfig(**TINY_TEXT, position_embedding_type="relative_key"),
                       attention={"name": "local", "window_size": 3})


# ---- float64 reference: HF 4.x BERT with head_mask and relative positions, written out plainly --------------------
def _reference_bert(state: dict, config: dict, input_ids, attention_mask, token_type_ids, head_mask=None,
                    position_embedding_type: str = "absolute"):
    """HF-keyed float64 state dict -> (last_hidden_state, pooler_output, attentions)."""

    def w(key):
        return state[key].double()

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim, max_pos = hidden // heads, config["max_position_embeddings"]
    batch, length = input_ids.shape
    x = w("embeddings.word_embeddings.weight")[input_ids] + w("embeddings.token_type_embeddings.weight")[token_type_ids]
    if position_embedding_type == "absolute":
        x = x + w("embeddings.position_embeddings.weight")[:length]
    x = F.layer_norm(x, (hidden,), w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), 1e-12)
    additive_mask = (1.0 - attention_mask.double())[:, None, None, :] * torch.finfo(torch.float64).min
    if head_mask is not None and head_mask.ndim == 1:
        head_mask = head_mask[None].expand(config["num_hidden_layers"], -1)
    attentions = []
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}.attention."

        q, k, v = (
            (x @ w(p + f"self.{name}.weight").T + w(p + f"self.{name}.bias"))
            .view(batch, length, heads, head_dim).transpose(1, 2)
            for name in ("query", "key", "value")
        )
        scores = q @ k.transpose(-1, -2)
        if position_embedding_type != "absolute":
            table = w(p + "self.distance_embedding.weight")
            rel = torch.stack([torch.stack([table[qi - ki + max_pos - 1] for ki in range(length)])
                               for qi in range(length)])  # (L_q, L_k, d): rel[qi, ki] = r(qi - ki)
            scores = scores + (q[:, :, :, None, :] * rel).sum(-1)  # query . r(qi - ki)
            if position_embedding_type == "relative_key_query":
                scores = scores + (k[:, :, None, :, :] * rel).sum(-1)  # key . r(qi - ki)
        probs = torch.softmax(scores / math.sqrt(head_dim) + additive_mask, dim=-1)
        if head_mask is not None:
            probs = probs * head_mask[i].double()[None, :, None, None]
        attentions.append(probs)
        context = (probs @ v).transpose(1, 2).reshape(batch, length, hidden)
        attn_out = context @ w(p + "output.dense.weight").T + w(p + "output.dense.bias")
        attn_out = F.layer_norm(attn_out + x, (hidden,), w(p + "output.LayerNorm.weight"),
                                w(p + "output.LayerNorm.bias"), 1e-12)
        q2 = f"encoder.layer.{i}."
        inter = F.gelu(attn_out @ w(q2 + "intermediate.dense.weight").T + w(q2 + "intermediate.dense.bias"))
        out = inter @ w(q2 + "output.dense.weight").T + w(q2 + "output.dense.bias")
        x = F.layer_norm(out + attn_out, (hidden,), w(q2 + "output.LayerNorm.weight"), w(q2 + "output.LayerNorm.bias"),
                         1e-12)
    pooled = torch.tanh(x[:, 0] @ w("pooler.dense.weight").T + w("pooler.dense.bias"))
    return x, pooled, attentions


def _saved_hf_state(model, path):
    from safetensors.torch import load_file

    model.save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


def _check_against_reference(ours, state, inputs, position_embedding_type="absolute", head_mask=None):
    ours = ours.double().eval()
    with torch.no_grad():
        out = ours(**inputs, head_mask=head_mask, output_attentions=True)
    ref = _reference_bert(state, TINY_TEXT, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                          head_mask=head_mask, position_embedding_type=position_embedding_type)
    torch.testing.assert_close(out.last_hidden_state, ref[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref[1], atol=1e-10, rtol=0)
    for mine, theirs in zip(out.attentions, ref[2]):
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=0)
    return out


# ---- (3) head_mask ---------------------------------------------------------------------------------------------
def test_head_mask_matches_reference(tmp_path):
    torch.manual_seed(3)
    model = AlignTextModel(AlignTextConfig(**TINY_TEXT)).eval()
    state = _saved_hf_state(model, tmp_path)
    inputs = _inputs()
    per_layer = torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]])
    out = _check_against_reference(model, state, inputs, head_mask=per_layer)
    assert out.attentions[0][:, 1].abs().max() == 0 and out.attentions[1][:, 0].abs().max() == 0
    _check_against_reference(model, state, inputs, head_mask=torch.tensor([1.0, 1.0, 0.0, 1.0]))
    with torch.no_grad():  # all-ones keeps every head: the fused result
        plain = model(**inputs).last_hidden_state
        ones = model(**inputs, head_mask=torch.ones(4, dtype=torch.float64)).last_hidden_state
        torch.testing.assert_close(ones, plain, atol=1e-10, rtol=0)
        zeroed = model(**inputs, head_mask=torch.zeros(4, dtype=torch.float64)).last_hidden_state
        assert (zeroed - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="head_mask must be"):
        model(**inputs, head_mask=torch.ones(3))
    # through AlignModel and get_text_features
    align = AlignModel(AlignConfig(**tiny_config_dict())).eval()
    with torch.no_grad():
        full = align(**inputs, pixel_values=_pixels(), head_mask=per_layer)
        text = align.text_model(**inputs, head_mask=per_layer)
        features = align.get_text_features(**inputs, head_mask=per_layer)
    torch.testing.assert_close(full.text_model_output.last_hidden_state, text.last_hidden_state)
    torch.testing.assert_close(features, align.text_projection(text.last_hidden_state[:, 0]))


# ---- (5) relative position embeddings ---------------------------------------------------------------------------
@pytest.mark.parametrize("position_embedding_type", ["relative_key", "relative_key_query"])
def test_relative_positions_match_reference_and_keep_hf_keys(tmp_path, position_embedding_type):
    torch.manual_seed(5)
    config = AlignTextConfig(**TINY_TEXT, position_embedding_type=position_embedding_type)
    model = AlignTextModel(config).eval()
    state = _saved_hf_state(model, tmp_path)
    key = "encoder.layer.1.attention.self.distance_embedding.weight"  # HF BertSelfAttention's name
    assert state[key].shape == (2 * TINY_TEXT["max_position_embeddings"] - 1, 8)
    inputs = _inputs()
    out = _check_against_reference(model, state, inputs, position_embedding_type=position_embedding_type)
    # loading the HF-keyed file gives the same model
    back = AlignTextModel.from_pretrained(tmp_path).double().eval()
    assert back.config.position_embedding_type == position_embedding_type
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).last_hidden_state, out.last_hidden_state)
    # relative positions change the result (the absolute table is unused)
    absolute = AlignTextModel(AlignTextConfig(**TINY_TEXT)).double().eval()
    absolute.load_state_dict({k: v for k, v in model.state_dict().items() if "distance_embedding" not in k})
    with torch.no_grad():
        assert (absolute(**inputs).last_hidden_state - out.last_hidden_state).abs().max() > 1e-3
    with pytest.raises(ValueError, match="position_embedding_type must be one of"):
        AlignTextConfig(position_embedding_type="rotary")


# ---- (6) return type ---------------------------------------------------------------------------------------------
def test_text_model_returns_pooling_and_cross_attentions_output():
    torch.manual_seed(0)
    model = AlignTextModel(AlignTextConfig(**TINY_TEXT)).eval()
    inputs = _inputs()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        as_tuple = model(**inputs, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert isinstance(out, BaseModelOutputWithPoolingAndCrossAttentions)
    assert out.past_key_values is None and out.cross_attentions is None
    assert list(out.keys()) == ["last_hidden_state", "pooler_output", "hidden_states", "attentions"]
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 4
    torch.testing.assert_close(as_tuple[0], out[0])
    torch.testing.assert_close(as_tuple[3][1], out["attentions"][1])


# ---- (7) config-level output flags ------------------------------------------------------------------------------
def test_config_output_flags_roundtrip_and_match_transformers(tmp_path):
    from transformers import AlignTextConfig as HFAlignTextConfig
    from transformers import AlignTextModel as HFAlignTextModel

    default = AlignTextConfig()
    assert (default.return_dict, default.output_hidden_states, default.output_attentions) == (True, False, False)
    torch.manual_seed(0)
    hf_config = HFAlignTextConfig(**TINY_TEXT, output_hidden_states=True, output_attentions=True, return_dict=False)
    hf_config._attn_implementation = "eager"
    hf = HFAlignTextModel(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = AlignTextModel.from_pretrained(tmp_path / "hf").eval()
    assert (ours.config.return_dict, ours.config.output_hidden_states, ours.config.output_attentions) == \
        (False, True, True)
    inputs = _inputs()
    with torch.no_grad():
        mine, theirs = ours(**inputs), hf(**inputs)
        overridden = ours(**inputs, return_dict=True, output_hidden_states=False, output_attentions=False)
    assert isinstance(mine, tuple) and isinstance(theirs, tuple) and len(mine) == len(theirs) == 4
    for x, y in zip(mine[2] + mine[3], theirs[2] + theirs[3]):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    assert overridden.hidden_states is None and overridden.attentions is None
    # our config.json keeps the flags, and transformers reads them
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (saved["return_dict"], saved["output_hidden_states"], saved["output_attentions"]) == (False, True, True)
    assert AlignTextConfig.from_pretrained(tmp_path / "ours") == ours.config
    back = HFAlignTextConfig.from_pretrained(tmp_path / "ours")
    assert (back.return_dict, back.output_hidden_states, back.output_attentions) == (False, True, True)


def test_align_config_flags_drive_align_model(tmp_path):
    config = AlignConfig(**tiny_config_dict(), return_dict=False, output_attentions=True, output_hidden_states=True)
    torch.manual_seed(0)
    model = AlignModel(config).eval()
    with torch.no_grad():
        out = model(**_inputs(), pixel_values=_pixels())
        as_dict = model(**_inputs(), pixel_values=_pixels(), return_dict=True)
    assert isinstance(out, tuple) and len(out) == 6  # logits x2, embeds x2, text and vision outputs (no loss)
    text_tuple, vision_tuple = out[4], out[5]
    assert isinstance(text_tuple, tuple) and len(text_tuple) == 4  # with hidden states and attentions
    assert isinstance(vision_tuple, tuple) and len(vision_tuple) == 3  # with hidden states
    assert len(as_dict.text_model_output.attentions) == 2
    model.save_pretrained(tmp_path)
    loaded = AlignConfig.from_pretrained(tmp_path)
    assert (loaded.return_dict, loaded.output_attentions, loaded.output_hidden_states) == (False, True, True)
    # a tower's own config flags drive the tower when used alone
    vision_config = AlignConfig(**tiny_config_dict()).vision_config
    vision_config.output_hidden_states, vision_config.return_dict = True, False
    with torch.no_grad():
        vision_out = AlignVisionModel(vision_config).eval()(_pixels())
    assert isinstance(vision_out, tuple) and len(vision_out) == 3


# ---- (14) hub ids ------------------------------------------------------------------------------------------------
def test_hub_id_gives_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from mmtrain.models.align import AlignProcessor, BertTokenizer, EfficientNetImageProcessor

    for load in (AlignModel.from_pretrained, AlignTextModel.from_pretrained, AlignVisionModel.from_pretrained,
                 AlignConfig.from_pretrained, AlignProcessor.from_pretrained, BertTokenizer.from_pretrained,
                 EfficientNetImageProcessor.from_pretrained):
        with pytest.raises(CheckpointError, match="hub ids are not supported") as info:
            load("kakaobrain/align-base")
        assert "\n" not in str(info.value) and "local folder" in str(info.value)
    with pytest.raises(CheckpointError, match="no config.json"):  # an existing folder keeps the old message
        (tmp_path / "org" / "name").mkdir(parents=True)
        AlignModel.from_pretrained("org/name")
