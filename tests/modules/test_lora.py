"""LoRA adapters: exact base output at init, the low-rank update formula, keys and trainability."""

import torch
from torch import nn

from mmtrain.models.llama3_2_vision import llama3_2_vision_tiny
from mmtrain.modules.lora import LoRALinear, apply_lora


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
