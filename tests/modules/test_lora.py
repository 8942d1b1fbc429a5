"""LoRA adapters: exact base output at init, the low-rank update formula, keys and trainability."""

import pytest
import torch
from torch import nn

from mmtrain.models.llama3_2_vision import llama3_2_vision_tiny
from mmtrain.modules.lora import DoRALinear, LoRALinear, apply_lora


def test_lora_linear_formula_and_zero_init() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 4, bias=True)
    lora = LoRALinear.from_linear(base, rank=2, alpha=4.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), base(x))
    with torch.no_grad():
        lora.lora_b.weight.normal_()
    a, b = lora.lora_a.weight.double(), lora.lora_b.weight.double()
    expected = x.double() @ base.weight.double().T + base.bias.double() + 2.0 * (x.double() @ a.T @ b.T)
    torch.testing.assert_close(lora(x).double(), expected, atol=1e-5, rtol=1e-5)
    assert sorted(lora.state_dict()) == ["bias", "lora_a.weight", "lora_b.weight", "weight"]


def test_apply_lora_to_decoder_attention() -> None:
    model = llama3_2_vision_tiny(decoder_trainable=False, encoder_trainable=False, fusion_trainable=False,
                                 lora_attn_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert "decoder.layers.0.attn.q_proj.lora_a.weight" in trainable
    assert "decoder.layers.1.fusion_layer.attn.v_proj.lora_b.weight" in trainable
    assert not any(n.startswith("encoder.") for n in trainable)
    assert "decoder.layers.0.attn.q_proj.weight" in model.state_dict()
    assert not apply_lora(nn.Linear(2, 2), ["q_proj"])


def test_disable_adapter_gives_the_base_layer_and_restores():
    from mmtrain.modules.lora import LoRALinear, disable_adapter

    torch.manual_seed(0)
    layer = LoRALinear(6, 5, rank=2, alpha=4.0, use_bias=True).double()
    torch.nn.init.normal_(layer.lora_b.weight)  # a trained adapter: not zero
    model = torch.nn.Sequential(layer)
    x = torch.randn(3, 6, dtype=torch.float64)
    base = x @ layer.weight.T + layer.bias  # float64 reference: W x + b
    with disable_adapter(model):
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    adapted = base + (x @ layer.lora_a.weight.T @ layer.lora_b.weight.T) * 2.0
    torch.testing.assert_close(model(x), adapted)
    assert layer.disabled is False and layer.use_bias is True


def test_merge_lora_state_dict_folds_each_update_into_its_weight() -> None:
    from mmtrain.modules.lora import merge_lora_state_dict

    torch.manual_seed(0)
    w, a, b = torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    w2, a2, b2 = torch.randn(3, 4), torch.randn(1, 4), torch.randn(3, 1)
    state = {"x.weight": w, "x.bias": torch.ones(5), "x.lora_a.weight": a, "x.lora_b.weight": b,
             "y.weight": w2, "y.lora_a.weight": a2, "y.lora_b.weight": b2, "z.weight": torch.zeros(2)}
    merged = merge_lora_state_dict(state, rank={"x": 2, "y": 1}, alpha={"x": 4.0, "y": 3.0})
    assert sorted(merged) == ["x.bias", "x.weight", "y.weight", "z.weight"]
    torch.testing.assert_close(merged["x.weight"].double(), w.double() + 2.0 * (b.double() @ a.double()))
    torch.testing.assert_close(merged["y.weight"].double(), w2.double() + 3.0 * (b2.double() @ a2.double()))
    assert torch.equal(state["x.weight"], w) and "x.lora_a.weight" in state  # the input is left as it was
    # Stored in the weight's dtype, computed in float32 (bf16 products would lose the small update).
    half = merge_lora_state_dict({"x.weight": w.bfloat16(), "x.lora_a.weight": a, "x.lora_b.weight": b}, 2, 4.0)
    assert half["x.weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="x.lora_a.weight has no x.lora_b.weight"):
        merge_lora_state_dict({"x.weight": w, "x.lora_a.weight": a}, 2, 4.0)
    with pytest.raises(ValueError, match="no rank/alpha given for y"):
        merge_lora_state_dict(state, rank={"x": 2}, alpha=4.0)


def test_merged_linear_computes_what_the_adapted_one_did() -> None:
    from mmtrain.modules.lora import apply_lora_to, merge_lora_state_dict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3)).double()
    assert apply_lora_to(model, ["1"], rank=2, alpha=4.0) == ["1.lora_a.weight", "1.lora_b.weight"]
    with torch.no_grad():
        model[1].lora_b.weight.normal_()
    plain = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3)).double()
    plain.load_state_dict(merge_lora_state_dict(model.state_dict(), 2, 4.0), strict=True)
    x = torch.randn(7, 6, dtype=torch.float64)
    torch.testing.assert_close(plain(x), model(x))
    with pytest.raises(ValueError, match="'0.weight' is not an nn.Linear"):
        apply_lora_to(model, ["0.weight"])


def test_lora_builder_places_adapters_as_torchtunes() -> None:
    """The adapted layers of torchtune's lora_llama3_2_vision builders at these settings (checked against torchtune
    0.6.1's component builders for every combination of the parts, mlp and output switches)."""
    from mmtrain.models.llama3_2_vision import lora_llama3_2_vision_tiny
    from mmtrain.modules.lora import LoRALinear

    def adapted(model):
        return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))

    model = lora_llama3_2_vision_tiny(["q_proj"], decoder_trainable="lora", encoder_trainable="frozen",
                                      fusion_trainable="LoRA", apply_lora_to_mlp=True, apply_lora_to_output=True,
                                      num_layers=2, clip_num_layers=1)
    mlp = [".mlp.w1", ".mlp.w2", ".mlp.w3"]
    assert adapted(model) == sorted([
        "decoder.layers.0.attn.q_proj", *("decoder.layers.0" + m for m in mlp), "decoder.output",
        "decoder.layers.1.layer.attn.q_proj", *("decoder.layers.1.layer" + m for m in mlp),
        "decoder.layers.1.fusion_layer.attn.q_proj", *("decoder.layers.1.fusion_layer" + m for m in mlp),
        "encoder.projection.layers.0.attn.q_proj", "encoder.projection.layers.0.mlp.w1",
        "encoder.projection.layers.0.mlp.w2", "encoder.projection.output"])
    # Only the adapters train: the fusion embeddings and the cross-attention gates stay frozen (torchtune's recipe).
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in adapted(model) for ab in "ab"}

    model = lora_llama3_2_vision_tiny(["v_proj", "output_proj"], decoder_trainable="frozen",
                                      encoder_trainable="lora", fusion_trainable="full", num_layers=2,
                                      clip_num_layers=1)
    assert adapted(model) == ["encoder.clip.layers.0.attn.output_proj", "encoder.clip.layers.0.attn.v_proj"]
    # "full": every fusion parameter trains (cross-attention layers, projection head, fusion embeddings), no other.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    fusion = {n for n, _ in model.named_parameters() if ".fusion_layer." in n or n.startswith("encoder.projection.")}
    assert trainable == fusion | {"decoder.tok_embeddings.fusion_embedding.weight"}


def test_lora_builder_refusals() -> None:
    from mmtrain.models.llama3_2_vision import lora_llama3_2_vision_tiny

    with pytest.raises(ValueError, match="encoder_trainable must be one of"):
        lora_llama3_2_vision_tiny(["q_proj"], encoder_trainable="half")
    with pytest.raises(ValueError, match="unknown \\['qkv'\\]"):
        lora_llama3_2_vision_tiny(["qkv"])
    with pytest.raises(ValueError, match="name at least one"):
        lora_llama3_2_vision_tiny([])
    with pytest.raises(ValueError, match="quantize_base \\(QLoRA"):
        lora_llama3_2_vision_tiny(["q_proj"], quantize_base=True)


def _trained_dora(bias: bool) -> tuple[nn.Linear, DoRALinear]:
    torch.manual_seed(0)
    base = nn.Linear(6, 4, bias=bias).double()
    dora = DoRALinear.from_linear(base, rank=2, alpha=4.0)
    with torch.no_grad():  # a trained adapter: B nonzero, magnitudes moved off the row norms
        dora.lora_b.weight.normal_()
        dora.magnitude.mul_(torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64))
    return base, dora


@pytest.mark.parametrize("bias", [False, True])
def test_dora_linear_against_the_papers_formula_in_float64(bias: bool) -> None:
    """y = m / ||W + s B A||_row * (W x + s B A x) + b, the row norms a constant in backward (DoRA, section 4.3)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4, bias=bias).double()
    fresh = DoRALinear.from_linear(base, rank=2, alpha=4.0)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), base(x), rtol=1e-12, atol=1e-12)  # starts as the layer it adapts
    torch.testing.assert_close(fresh.magnitude, base.weight.norm(dim=1))
    assert sorted(fresh.state_dict()) == sorted(["weight", "lora_a.weight", "lora_b.weight", "magnitude"]
                                                + (["bias"] if bias else []))

    base, dora = _trained_dora(bias)
    w, a, b, m = (t.detach().clone() for t in (base.weight, dora.lora_a.weight, dora.lora_b.weight, dora.magnitude))
    a.requires_grad_(), b.requires_grad_(), m.requires_grad_()
    norms = (w + 2.0 * b.detach() @ a.detach()).norm(dim=1)
    expected = (m / norms) * (x @ w.T + 2.0 * (x @ a.T) @ b.T)
    if bias:
        expected = expected + base.bias.detach()
    weights = torch.randn(3, 4, dtype=torch.float64)
    (expected * weights).sum().backward()
    out = dora(x)
    (out * weights).sum().backward()
    torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-12)
    for got, want in ((dora.magnitude.grad, m.grad), (dora.lora_a.weight.grad, a.grad),
                      (dora.lora_b.weight.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert dora.adapter_params() == ["lora_a.weight", "lora_b.weight", "magnitude"]


def test_dora_merge_computes_what_the_adapted_layer_did() -> None:
    from mmtrain.modules.lora import disable_adapter, merge_lora_state_dict

    base, dora = _trained_dora(bias=True)
    model = nn.Sequential(dora)
    merged = merge_lora_state_dict(model.state_dict(), rank=2, alpha=4.0)
    assert sorted(merged) == ["0.bias", "0.weight"]
    plain = nn.Sequential(nn.Linear(6, 4)).double()
    plain.load_state_dict(merged, strict=True)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(plain(x), model(x).detach(), rtol=1e-12, atol=1e-12)
    with disable_adapter(model):  # the base layer alone, magnitude and adapters ignored
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="0.magnitude has no lora_a"):
        merge_lora_state_dict({"0.weight": merged["0.weight"], "0.magnitude": torch.ones(4)}, 2, 4.0)


def test_dora_builder_trains_adapters_and_magnitudes_only() -> None:
    from mmtrain.models.llama3_2_vision import lora_llama3_2_vision_tiny
    model = lora_llama3_2_vision_tiny(["q_proj", "v_proj"], use_dora=True, num_layers=2, clip_num_layers=1)
    layers = sorted(n for n, m in model.named_modules() if isinstance(m, DoRALinear))
    assert "decoder.layers.1.fusion_layer.attn.q_proj" in layers and "encoder.clip.layers.0.attn.v_proj" in layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in layers for p in ("lora_a.weight", "lora_b.weight", "magnitude")}
    assert "decoder.layers.1.fusion_layer.attn.q_proj.magnitude" in model.state_dict()
    names = apply_lora(nn.Sequential(nn.Module()), ["q_proj"], use_dora=True)
    assert names == []
