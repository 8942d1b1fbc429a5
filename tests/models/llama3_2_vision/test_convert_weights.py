"""HF Llama 3.2 Vision <-> mmtrain weights: logits parity with transformers' MllamaForConditionalGeneration, exact
round trips, and ``load_hf_checkpoint`` on ``save_pretrained`` folders (single file and sharded).

Where transformers computes something other than Meta's reference (the code the published weights were trained
with), which torchtune 0.6.1 and mmtrain follow, the parity tests put Meta's semantics into the HF model, each in one
place and for the reason given there (``meta_semantics``, ``_hf_index_offset``). Everything else, including
the weight layouts the conversion handles, is transformers' own code.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmtrain.errors import UserError
from mmtrain.models.llama3_2_vision import (
    hf_to_mmtrain,
    llama3_2_vision_11b,
    llama3_2_vision_decoder,
    llama3_2_vision_encoder,
    load_hf_checkpoint,
    mmtrain_to_hf,
)
from mmtrain.models.llama3_2_vision._convert_weights import HFCheckpointError, default_aspect_ratios
from mmtrain.modules.fusion import DeepFusionModel

transformers = pytest.importorskip("transformers")
modeling_mllama = pytest.importorskip("transformers.models.mllama.modeling_mllama")

# Tiny shapes: vision width 32 (2 heads), 3 CLIP layers + 1 global layer, 16 px tiles of 8 px patches (5 tokens
# per tile, which HF pads to 8), up to 2 tiles; text width 64 (4 heads, 2 KV heads), 6 HF layers of which 1 and 4
# cross-attend (mmtrain: 4 decoder layers, a fusion layer before layers 2 and 4).
VISION, TILES, TILE, PATCH = 32, 2, 16, 8
TOKENS = (TILE // PATCH) ** 2 + 1
RATIOS = [(1, 1), (1, 2), (2, 1)]
HF_HIDDEN = [0, 1]  # intermediate_layers_indices
DIM, HEADS, KV_HEADS, VOCAB = 64, 4, 2, 128
IMAGE_TOKEN = VOCAB  # the first fusion token, as <|image|> = 128256 in the real vocabulary
CONVERT = dict(num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM, vocab_size=VOCAB, encoder_dim=VISION, tile_size=TILE,
               num_tiles=TILES, supported_aspect_ratios=RATIOS)
ROPE = dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192)


def tiny_config():
    return transformers.MllamaConfig(
        vision_config=dict(hidden_size=VISION, attention_heads=2, num_hidden_layers=3, num_global_layers=1,
                           intermediate_size=4 * VISION, vision_output_dim=VISION * (1 + len(HF_HIDDEN)),
                           image_size=TILE, patch_size=PATCH, max_num_tiles=TILES,
                           intermediate_layers_indices=HF_HIDDEN, supported_aspect_ratios=[list(r) for r in RATIOS]),
        text_config=dict(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=6, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, intermediate_size=128, cross_attention_layers=[1, 4],
                         max_position_embeddings=16_384, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         rope_parameters=ROPE),
        attn_implementation="sdpa",  # eager attention takes its softmax in float32 even in a float64 model
    )


def grid_to_hf_table(grid: torch.Tensor) -> torch.Tensor:
    """A (T, T, e, v) tile grid as HF's per-aspect-ratio table, as HF's converter from Meta's weights builds it:
    row i + 1 = the h * w tiles of ratio i, zeros for padding tiles and for row 0 (no image)."""
    table = torch.zeros(len(RATIOS) + 1, TILES, *grid.shape[2:], dtype=grid.dtype)
    for i, (h, w) in enumerate(RATIOS):
        table[i + 1, : h * w] = grid[:h, :w].reshape(h * w, *grid.shape[2:])
    return table.flatten(1)


def randomize(model: torch.nn.Module, seed: int, embed_std: float = 0.05) -> None:
    """Weights of every kind away from their initial values: gates open (HF starts some at 0, where a swapped or
    dropped gate goes unseen), norm scales around 1, small token embeddings (so a norm eps is visible), tile tables
    built from a grid like every published checkpoint's."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn")):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 1.6 - 0.8)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * embed_std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        vision = model.model.vision_model
        for table, tokens in ((vision.pre_tile_positional_embedding.embedding.weight, 1),
                              (vision.post_tile_positional_embedding.embedding.weight, 1),
                              (vision.gated_positional_embedding.tile_embedding.weight, TOKENS)):
            grid = torch.randn(TILES, TILES, tokens, VISION, generator=gen, dtype=table.dtype) * 0.5
            table.copy_(grid_to_hf_table(grid))


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(tiny_config()).double().eval()
    randomize(model, seed=1)
    return model


def _hf_index_offset(hf_model) -> int:
    """How transformers reads ``intermediate_layers_indices``: 0 when hidden state i is the input of layer i
    (Meta's ``return_intermediate``, transformers 4.x, torchtune), 1 when it is the output of layer i (transformers
    5.x collects after each layer). The conversion keeps the config's indices, which are Meta's."""
    x = torch.randn(1, 8, VISION, dtype=torch.float64)
    with torch.no_grad():
        states = hf_model.model.vision_model.transformer(x).hidden_states
    return 0 if torch.equal(states[0], x) else 1


def mmtrain_model(clip_hidden_states: list[int]) -> DeepFusionModel:
    # float64 before loading: loading into float32 parameters would round the weights.
    encoder = llama3_2_vision_encoder(patch_size=PATCH, num_heads=2, clip_embed_dim=VISION, clip_num_layers=3,
                                      clip_hidden_states=clip_hidden_states, num_layers_projection=1,
                                      decoder_embed_dim=DIM, tile_size=TILE, max_num_tiles=TILES)
    decoder = llama3_2_vision_decoder(vocab_size=VOCAB, num_layers=4, fusion_interval=2, num_special_tokens=8,
                                      num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM, max_seq_len=16_384,
                                      encoder_max_seq_len=2 * TILES * TOKENS, intermediate_dim=128)
    return DeepFusionModel(decoder=decoder, encoder=encoder).double().eval()


@pytest.fixture(scope="module")
def converted(hf_model):
    model = mmtrain_model([i + _hf_index_offset(hf_model) for i in HF_HIDDEN])
    model.load_state_dict(hf_to_mmtrain(hf_model.state_dict(), **CONVERT), strict=True)
    return model


@pytest.fixture
def meta_semantics(monkeypatch, hf_model):
    """Two places where transformers departs from Meta's reference and torchtune 0.6.1 / mmtrain follow Meta:

    - Vision: HF (like Meta) pads each tile's tokens to a multiple of 8 and builds a mask that hides only padding
      from padding, so real tokens attend to the padding tokens; torchtune and mmtrain have no padding tokens. The
      mask builder is replaced by one that hides the padding tokens from every query and masks nothing else
      (torchtune attends across all tiles, padding tiles included), which makes HF compute torchtune's function.
    - Text: Meta's ``CrossAttention.forward`` multiplies the attention output by ``full_text_row_masked_out_mask``
      (a token that sees no image gets nothing from cross-attention), torchtune and mmtrain skip those rows;
      transformers zeroes only the MLP branch. A forward hook adds Meta's multiplication to HF's cross-attention.

    Yields ``set_rows(cross_attention_mask)``, which tells the hook the rows of the next forward.
    """

    def torchtune_mask(aspect_ratio_mask, num_patches, target_length, dtype):
        images, tiles = aspect_ratio_mask.shape
        padding = (torch.arange(target_length) >= num_patches).repeat(tiles)
        mask = torch.zeros(images, 1, tiles * target_length, tiles * target_length, dtype=dtype)
        mask[..., padding] = torch.finfo(dtype).min
        return mask

    monkeypatch.setattr(modeling_mllama, "_prepare_aspect_ratio_attention_mask", torchtune_mask)
    rows = {}

    def zero_rows_without_image(module, args, output):
        if "keep" not in rows:
            return output
        return (output[0] * rows["keep"][..., None].to(output[0].dtype), *output[1:])

    handles = [m.register_forward_hook(zero_rows_without_image) for m in hf_model.modules()
               if isinstance(m, modeling_mllama.MllamaTextCrossAttention)]

    def set_rows(cross_attention_mask: torch.Tensor) -> None:
        rows["keep"] = cross_attention_mask.flatten(2).any(-1)

    yield set_rows
    for handle in handles:
        handle.remove()


def batch():
    """Three samples, two image slots of up to 2 tiles, 10 tokens:

    0: image A (1 x 2 tiles) at token 0, image B (2 x 1) at token 6: tokens 0-5 see A, 6-9 see B;
    1: one image of 1 tile (its second tile is padding) at token 0, then an empty image slot;
    2: text first, then an image (2 x 1) at token 3: tokens 0-2 see no image.

    Returns (HF inputs, mmtrain inputs): HF's ``aspect_ratio_ids`` (ratio index + 1, 0 for no image),
    ``aspect_ratio_mask`` (first tile always 1, as HF's processor) and ``cross_attention_mask`` (b, s, images,
    tiles); mmtrain's ``aspect_ratio`` (rows, cols; (1, 1) for an empty slot, as the collator) and ``encoder_mask``
    (b, s, images * tiles * tokens), True where a token attends: the collator's layout, image-major then tile.
    """
    gen = torch.Generator().manual_seed(2)
    seq = 10
    grids = [[(1, 2), (2, 1)], [(1, 1), None], [(2, 1), None]]
    starts = [[0, 6], [0, None], [3, None]]
    b, images = len(grids), 2
    pixels = torch.randn(b, images, TILES, 3, TILE, TILE, generator=gen, dtype=torch.float64)
    tokens = torch.randint(4, VOCAB, (b, seq), generator=gen)
    ratio_ids = torch.zeros(b, images, dtype=torch.long)
    ratio_mask = torch.zeros(b, images, TILES, dtype=torch.long)
    ratio_mask[:, :, 0] = 1
    aspect_ratio = torch.ones(b, images, 2, dtype=torch.long)
    cross = torch.zeros(b, seq, images, TILES, dtype=torch.long)
    for row in range(b):
        for img in range(images):
            grid = grids[row][img]
            if grid is None:
                pixels[row, img] = 0
                continue
            n_tiles = grid[0] * grid[1]
            pixels[row, img, n_tiles:] = 0  # padding tiles are zeros, as HF's processor and our collator make them
            ratio_ids[row, img] = RATIOS.index(grid) + 1
            ratio_mask[row, img, :n_tiles] = 1
            aspect_ratio[row, img] = torch.tensor(grid)
            start = starts[row][img]
            end = next((s for s in starts[row][img + 1:] if s is not None), seq)
            tokens[row, start] = IMAGE_TOKEN
            cross[row, start:end, img, :n_tiles] = 1
    hf = dict(input_ids=tokens, pixel_values=pixels, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask,
              cross_attention_mask=cross)
    ours = dict(tokens=tokens, encoder_input={"images": pixels, "aspect_ratio": aspect_ratio},
                encoder_mask=cross.repeat_interleave(TOKENS, dim=-1).reshape(b, seq, -1).bool())
    return hf, ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- parity ---------------------------------------------------------------------------------------------------------


def test_encoder_output_matches_hf_in_float64(hf_model, converted, meta_semantics):
    """Everything in the vision path is float64 on both sides: patch conv, the tile tables read back as a grid,
    gated positional embeddings, CLS, the hidden-state interleave, the gated global layers, the projector."""
    hf_in, ours_in = batch()
    with torch.no_grad():
        hf_out = hf_model.model.vision_model(pixel_values=hf_in["pixel_values"],
                                             aspect_ratio_ids=hf_in["aspect_ratio_ids"],
                                             aspect_ratio_mask=hf_in["aspect_ratio_mask"]).last_hidden_state
        hf_out = hf_model.model.multi_modal_projector(hf_out)  # (b, images, tiles, tokens, d)
        ours = converted.encoder(**ours_in["encoder_input"]).reshape(hf_out.shape)
    real = hf_in["aspect_ratio_ids"] > 0  # empty slots: HF looks up no tile embedding (id 0), the collator (1, 1)
    assert rel_err(ours[real], hf_out[real]) < 1e-12  # padding tiles of real images included


def test_logits_match_hf(hf_model, converted, meta_semantics):
    """Every position of every sample, text before the first image included. The tolerance is float32's, not
    float64's: HF and mmtrain (as torchtune) both compute RMSNorm and RoPE in float32 even in a float64 model, in
    different orders; the weights are not the limit (a permuted head or a wrong layer gives O(1) errors, a norm eps
    of 1e-6 instead of 1e-5 about 1e-4)."""
    hf_in, ours_in = batch()
    meta_semantics(hf_in["cross_attention_mask"])
    with torch.no_grad():
        hf_logits = hf_model(**hf_in).logits
        ours = converted(ours_in["tokens"], encoder_input=ours_in["encoder_input"],
                         encoder_mask=ours_in["encoder_mask"])
    assert rel_err(ours, hf_logits) < 2e-6


def test_logits_match_hf_text_only(hf_model, converted):
    """No image: HF skips its cross-attention layers, mmtrain's fusion layers pass the tokens through."""
    hf_in, ours_in = batch()
    with torch.no_grad():
        assert rel_err(converted(ours_in["tokens"]), hf_model(input_ids=hf_in["input_ids"]).logits) < 2e-6


def test_cross_attention_layer_matches_hf(hf_model, converted):
    """One cross-attention layer on small activations, where a norm eps shows: HF and Meta use rms_norm_eps (1e-5)
    for its ca_norm / mlp_norm; torchtune 0.6.1 leaves them at RMSNorm's default 1e-6 (mmtrain did too)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, DIM, generator=gen, dtype=torch.float64) * 0.01
    states = torch.randn(2, TILES * TOKENS, DIM, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        hf_layer = hf_model.model.language_model.layers[1]
        full = torch.ones(2, 1, 5, 1, dtype=torch.float64)  # every row sees the image
        hf_out = hf_layer(x, cross_attention_states=states, cross_attention_mask=torch.zeros(2, 1, 5, TILES * TOKENS,
                          dtype=torch.float64), attention_mask=None, full_text_row_masked_out_mask=full)
        ours = converted.decoder.layers[1].fusion_layer(x, encoder_input=states,
                                                        encoder_mask=torch.ones(2, 5, TILES * TOKENS, dtype=torch.bool))
    assert rel_err(ours - x, hf_out - x) < 1e-5


# ---- round trips ----------------------------------------------------------------------------------------------------


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_round_trip_hf_module_keys(hf_model):
    sd = hf_model.state_dict()
    assert_same(mmtrain_to_hf(hf_to_mmtrain(sd, **CONVERT), layout="transformers", **CONVERT), sd)


def test_round_trip_hf_file_keys(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    on_disk = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in on_disk)  # the file spelling, not the module tree
    assert_same(mmtrain_to_hf(hf_to_mmtrain(on_disk, **CONVERT), **CONVERT), on_disk)


def test_round_trip_mmtrain_keys():
    """Exact, except the tile-grid cells no supported aspect ratio reaches (here (1, 1) of the 2 x 2 grid), which
    HF does not store and mmtrain never reads: they come back as zeros."""
    model = mmtrain_model([1, 2])
    gen = torch.Generator().manual_seed(4)
    sd = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in model.state_dict().items()}
    for key in ("encoder.clip.pre_tile_pos_embed.embedding", "encoder.clip.post_tile_pos_embed.embedding",
                "encoder.clip.token_pos_embedding.global_token_positional_embedding"):
        sd[key][1, 1] = 0
    assert_same(hf_to_mmtrain(mmtrain_to_hf(sd, **CONVERT), **CONVERT), sd)


def test_hf_layout_of_the_11b_shapes():
    """The published 11B, both ways: every HF tensor of MllamaForConditionalGeneration (image_size 560) comes out
    of llama3_2_vision_11b's state dict with its shape, and the reverse (both built on the meta device)."""
    with torch.device("meta"):
        ours = llama3_2_vision_11b(encoder_trainable=False).state_dict()
        hf = transformers.MllamaForConditionalGeneration(
            transformers.MllamaConfig(vision_config={"image_size": 560})).state_dict()
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    assert shapes(mmtrain_to_hf(ours, layout="transformers")) == shapes(hf)
    assert shapes(hf_to_mmtrain(hf)) == shapes(ours)  # the defaults are the 11B's


def test_q_k_permutation_turns_halves_into_pairs():
    """Row j < hd/2 of an HF head (first half) is row 2j of ours, row hd/2 + j is row 2j + 1."""
    hd = DIM // HEADS
    q = torch.arange(HEADS * hd, dtype=torch.float64)[:, None].expand(-1, DIM).clone()
    out = hf_to_mmtrain({"language_model.model.layers.0.self_attn.q_proj.weight": q}, **CONVERT)
    rows = out["decoder.layers.0.attn.q_proj.weight"][:, 0].long().tolist()
    head0 = [j // 2 if j % 2 == 0 else hd // 2 + j // 2 for j in range(hd)]
    assert rows[:hd] == head0 and rows[hd:2 * hd] == [hd + r for r in head0]


def test_disagreeing_tile_rows_warn(hf_model):
    """A table fine-tuned in HF (each ratio's row on its own) has no single grid: converted with a warning."""
    sd = dict(hf_model.state_dict())
    key = "model.vision_model.pre_tile_positional_embedding.embedding.weight"
    sd[key] = sd[key] + 1.0
    with pytest.warns(UserWarning, match="pre_tile_positional_embedding.embedding.weight"):
        hf_to_mmtrain(sd, **CONVERT)


def test_default_aspect_ratios_are_hf_defaults():
    assert default_aspect_ratios(4) == [tuple(r) for r in transformers.MllamaVisionConfig().supported_aspect_ratios]


def test_conversion_errors(hf_model):
    sd = dict(hf_model.state_dict())
    with pytest.raises(ValueError, match=r"^model\.vision_model\.extra: no mmtrain parameter maps to this key$"):
        hf_to_mmtrain({**sd, "model.vision_model.extra": torch.zeros(1)}, **CONVERT)
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.weight: shape \(64, 64\) does not fit 8 heads"):
        hf_to_mmtrain(sd, **{**CONVERT, "num_heads": 8, "head_dim": 16})
    with pytest.raises(ValueError, match=r"cross_attention_layers=\[2, 4\] but the state dict has cross-attention "
                                         r"weights in HF layers \[1, 4\]"):
        hf_to_mmtrain(sd, **CONVERT, cross_attention_layers=[2, 4])
    with pytest.raises(ValueError, match="tile_size=32 with patch 8 gives 17"):
        hf_to_mmtrain(sd, **{**CONVERT, "tile_size": 32})
    with pytest.raises(ValueError, match="decoder.layers.0.attn.lora_a.weight: no HF parameter maps to this key"):
        mmtrain_to_hf({"decoder.layers.0.attn.lora_a.weight": torch.zeros(1)}, **CONVERT)


# ---- load_hf_checkpoint -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory):
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    hf_model.save_pretrained(single, safe_serialization=True)
    hf_model.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    return single, sharded


def test_load_hf_checkpoint_single_and_sharded(hf_model, saved):
    single, sharded = saved
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    expected = hf_to_mmtrain(hf_model.state_dict(), **CONVERT)
    for folder in (single, sharded):
        state, kwargs = load_hf_checkpoint(folder)
        assert_same(state, expected)
        assert kwargs["encoder"] == dict(patch_size=PATCH, num_heads=2, clip_embed_dim=VISION, clip_num_layers=3,
                                         clip_hidden_states=HF_HIDDEN, num_layers_projection=1, decoder_embed_dim=DIM,
                                         tile_size=TILE, max_num_tiles=TILES, in_channels=3)
        assert kwargs["decoder"] == dict(vocab_size=VOCAB, num_layers=4, fusion_interval=2, num_special_tokens=8,
                                         num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM, max_seq_len=16_384,
                                         encoder_max_seq_len=20 * TILES * TOKENS, rope_base=500_000.0,
                                         intermediate_dim=128)
    model = DeepFusionModel(encoder=llama3_2_vision_encoder(**kwargs["encoder"]),
                            decoder=llama3_2_vision_decoder(**kwargs["decoder"]))
    model.load_state_dict(state, strict=True)


def test_load_hf_checkpoint_reads_transformers_4_config(hf_model, saved, tmp_path):
    """The Hub's config.json files (transformers 4.x) spell RoPE as rope_theta + rope_scaling."""
    single, _ = saved
    config = json.loads((single / "config.json").read_text())
    rope = config["text_config"].pop("rope_parameters")
    config["text_config"]["rope_theta"] = rope.pop("rope_theta")
    config["text_config"]["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(single / "model.safetensors", tmp_path / "model.safetensors")
    assert load_hf_checkpoint(tmp_path)[1]["decoder"]["rope_base"] == 500_000.0


# The architecture fields of meta-llama/Llama-3.2-11B-Vision(-Instruct)'s config.json (transformers 4.x spelling).
HUB_11B_CONFIG = {
    "model_type": "mllama",
    "image_token_index": 128256,
    "text_config": {
        "model_type": "mllama_text_model", "vocab_size": 128256, "hidden_size": 4096, "hidden_act": "silu",
        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
        "rms_norm_eps": 1e-05, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "mllama_vision_model", "hidden_size": 1280, "hidden_act": "gelu", "num_hidden_layers": 32,
        "num_global_layers": 8, "attention_heads": 16, "num_channels": 3, "intermediate_size": 5120,
        "vision_output_dim": 7680, "image_size": 560, "patch_size": 14, "norm_eps": 1e-05, "max_num_tiles": 4,
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    },
}


def test_11b_config_gives_the_11b_preset():
    """The published config.json gives exactly the arguments llama3_2_vision_11b(image_size=560) builds with."""
    from mmtrain.models.llama3_2_vision._convert_weights import _builder_kwargs

    kwargs = _builder_kwargs(HUB_11B_CONFIG, num_special_tokens=8)
    assert kwargs["encoder"] == dict(patch_size=14, num_heads=16, clip_embed_dim=1280, clip_num_layers=32,
                                     clip_hidden_states=[3, 7, 15, 23, 30], num_layers_projection=8,
                                     decoder_embed_dim=4096, tile_size=560, max_num_tiles=4, in_channels=3)
    assert kwargs["decoder"] == dict(vocab_size=128_256, num_layers=32, fusion_interval=4, num_special_tokens=8,
                                     num_heads=32, num_kv_heads=8, embed_dim=4096, max_seq_len=131_072,
                                     encoder_max_seq_len=128_080, rope_base=500_000.0, intermediate_dim=14_336)


def _copy_folder(src, dst, config_edit=None, weights_edit=None):
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    weights = load_file(src / "model.safetensors")
    if weights_edit:
        weights_edit(weights)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_load_hf_checkpoint_errors(saved, tmp_path):
    single, sharded = saved
    with pytest.raises(FileNotFoundError, match="no_such_folder: no such folder"):
        load_hf_checkpoint(tmp_path / "no_such_folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json: missing"):
        load_hf_checkpoint(tmp_path / "empty")

    def clip_type(config):
        config["model_type"] = "clip"

    (tmp_path / "clip").mkdir()
    with pytest.raises(ValueError, match="model_type is 'clip', expected 'mllama'") as raised:
        load_hf_checkpoint(_copy_folder(single, tmp_path / "clip", config_edit=clip_type))
    # A UserError: the CLI prints it as one line and exits with status 2.
    assert isinstance(raised.value, HFCheckpointError) and isinstance(raised.value, UserError)

    def stray(weights):
        weights["vision_model.extra_scale"] = torch.ones(1, dtype=torch.float64)

    (tmp_path / "stray").mkdir()
    with pytest.raises(ValueError, match=r"^vision_model\.extra_scale: no mmtrain parameter maps to this key$"):
        load_hf_checkpoint(_copy_folder(single, tmp_path / "stray", weights_edit=stray))

    def wider(config):
        config["text_config"]["intermediate_size"] = 256

    (tmp_path / "wider").mkdir()
    with pytest.raises(ValueError, match=r"^decoder\.layers\.0\.mlp\.w2\.weight: shape \(64, 128\) from the "
                                         r"checkpoint, \(64, 256\) from config\.json$"):
        load_hf_checkpoint(_copy_folder(single, tmp_path / "wider", config_edit=wider))

    def no_scaling(config):
        config["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000.0}

    (tmp_path / "rope").mkdir()
    with pytest.raises(ValueError, match="not the Llama 3.1 scaling"):
        load_hf_checkpoint(_copy_folder(single, tmp_path / "rope", config_edit=no_scaling))

    partial = tmp_path / "partial"
    partial.mkdir()
    for f in sharded.iterdir():
        os.symlink(f, partial / f.name)
    os.remove(partial / sorted(p.name for p in sharded.glob("model-*.safetensors"))[0])
    with pytest.raises(FileNotFoundError, match=r"model-00001-of-\d+\.safetensors: missing \(listed in "):
        load_hf_checkpoint(partial)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint made from a grid converts without the tile-table warning
        load_hf_checkpoint(single)
