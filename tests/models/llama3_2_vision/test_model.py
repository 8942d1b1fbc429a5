"""Llama 3.2 Vision builders: torchtune key names, the 11B parameter count from its shapes, cached generation."""

import pytest
import torch

from mmtrain.data.collate import padded_collate_tiled_images_and_mask
from mmtrain.generation import generate
from mmtrain.models.llama3_2_vision import llama3_2_vision_11b, llama3_2_vision_tiny
from mmtrain.models.llama3_2_vision._memory import count_parameters, estimate_memory


def expected_tiny_decoder_keys() -> set[str]:
    keys = {"decoder.tok_embeddings.weight", "decoder.tok_embeddings.fusion_embedding.weight", "decoder.norm.scale",
            "decoder.output.weight"}
    for i in range(4):
        p = f"decoder.layers.{i}."
        keys |= {p + k for k in ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                                 "attn.output_proj.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight",
                                 "sa_norm.scale", "mlp_norm.scale")}
        if i in (1, 3):  # fusion_interval=2: layers 2 and 4 (1-based) carry a cross-attention layer
            f = p + "fusion_layer."
            keys |= {f + k for k in ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                                     "attn.output_proj.weight", "attn.q_norm.scale", "attn.k_norm.scale",
                                     "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight", "ca_norm.scale",
                                     "mlp_norm.scale", "ca_scale.scale", "mlp_scale.scale")}
    return keys


def test_tiny_state_dict_keys_match_torchtune() -> None:
    keys = set(llama3_2_vision_tiny().state_dict())
    assert {k for k in keys if k.startswith("decoder.")} == expected_tiny_decoder_keys()
    encoder = {k for k in keys if k.startswith("encoder.")}
    assert {"encoder.clip.conv.weight", "encoder.clip.cls_token_embedding.weight", "encoder.clip.ln_pre.weight",
            "encoder.clip.layers.1.attn.q_proj.weight", "encoder.projection.layers.0.sa_scale.scale",
            "encoder.projection.output.weight", "encoder.projection.output.bias"} <= encoder
    assert keys == {k for k in keys if k.startswith(("decoder.", "encoder."))}


def _llama_11b_count() -> int:
    d, kv, hidden, vocab, v = 4096, 1024, 14336, 128_256, 1280
    attn = 2 * d * d + 2 * d * kv
    mlp = 3 * d * hidden
    self_layer = attn + mlp + 2 * d
    cross_layer = attn + 2 * 128 + mlp + 2 * d + 2
    decoder = vocab * d + 8 * d + 32 * self_layer + 8 * cross_layer + d + vocab * d
    tokens = (560 // 14) ** 2 + 1  # 1601 per tile
    clip_layer = 4 * v * v + (v * 4 * v + 4 * v) + (4 * v * v + v) + 4 * v
    clip = (3 * 14 * 14 * v + v  # patch conv (no bias), CLS
            + tokens * v + 4 * 4 * tokens * v + 1  # tiled token positional embedding: local, global, gate
            + 2 * (4 * 4 * v + 1)  # pre / post tile positional embeddings with gates
            + 4 * v + 32 * clip_layer)  # ln_pre, ln_post, layers
    projection = 8 * (clip_layer + 2) + 6 * v * d + d
    return decoder + clip + projection


def test_11b_on_meta_device_has_published_shapes_count() -> None:
    with torch.device("meta"):
        model = llama3_2_vision_11b(encoder_trainable=False)
    total, trainable = count_parameters(model)
    assert total == _llama_11b_count()
    assert 10.5e9 < total < 10.7e9  # "11B" Vision: ~10.6B incl. the vision encoder
    fusion = sum(p.numel() for n, p in model.named_parameters() if ".fusion_layer." in n or "projection" in n
                 or "fusion_embedding" in n)
    assert trainable == fusion
    fsdp8 = estimate_memory(model, strategy="fsdp", world_size=8, batch_size=8, seq_len=512,
                            activation_checkpointing=True)
    ddp8 = estimate_memory(model, strategy="ddp", world_size=8, batch_size=8, seq_len=512,
                           activation_checkpointing=True)
    assert fsdp8.optimizer * 8 == ddp8.optimizer == trainable * 8
    # Frozen weights: bf16 shards under FSDP (as the recipe stores them), fp32 replicas under DDP (autocast).
    assert fsdp8.weights == (trainable * 4 + (total - trainable) * 2) / 8
    assert ddp8.weights == total * 4
    assert fsdp8.total < ddp8.total


def test_generation_with_kv_cache_equals_full_recompute() -> None:
    from mmtrain.data.vqa import ShapesVQA, VQATokenizer

    torch.manual_seed(0)
    model = llama3_2_vision_tiny()
    with torch.no_grad():  # open the gates so cross-attention matters
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.fill_(0.8)
    tokenizer = VQATokenizer()
    ds = ShapesVQA("validation", 4, tokenizer)
    prompts = [ds.prompt_sample(i)[0] for i in range(4)]
    batch = padded_collate_tiled_images_and_mask(prompts, pad_direction="left")
    kwargs = dict(max_new_tokens=6, pad_id=0, encoder_input=batch["encoder_input"],
                  encoder_mask=batch["encoder_mask"], stop_early=False)
    cached = generate(model, batch["tokens"], use_cache=True, **kwargs)
    full = generate(model, batch["tokens"], use_cache=False, **kwargs)
    assert cached.shape == (4, batch["tokens"].shape[1] + 6)
    assert torch.equal(cached, full)
    assert not model.caches_are_setup()  # caches removed: training can continue


def test_generation_with_a_mechanism_that_takes_no_mask_decodes_each_row_unpadded() -> None:
    # Favor and Nystrom are causal by themselves but take no attention mask: left padding cannot be masked out.
    from mmtrain.data.vqa import ShapesVQA, VQATokenizer

    torch.manual_seed(0)
    model = llama3_2_vision_tiny(attention={"name": "favor", "dim_features": 16}).eval()
    tokenizer = VQATokenizer()
    ds = ShapesVQA("validation", 3, tokenizer)
    prompts = [ds.prompt_sample(i)[0] for i in range(3)]
    prompts[1]["tokens"] = prompts[1]["tokens"][:1] + prompts[1]["tokens"][3:]  # a shorter prompt: left padding
    prompts[1]["encoder_mask"] = [m[2:] for m in prompts[1]["encoder_mask"]]
    batch = padded_collate_tiled_images_and_mask(prompts, pad_direction="left")
    assert (batch["tokens"][1, :2] == 0).all()
    out = generate(model, batch["tokens"], max_new_tokens=4, pad_id=0, encoder_input=batch["encoder_input"],
                   encoder_mask=batch["encoder_mask"], stop_early=False)
    assert out.shape == (3, batch["tokens"].shape[1] + 4)
    with torch.no_grad():
        for row, sample in enumerate(prompts):  # plain greedy decoding of the unpadded prompt, no mask, no cache
            padding = batch["tokens"].shape[1] - len(sample["tokens"])
            tokens = batch["tokens"][row : row + 1, padding:]
            images = {key: value[row : row + 1] for key, value in batch["encoder_input"].items()}
            encoder_mask = batch["encoder_mask"][row : row + 1, padding:]
            for _ in range(4):
                logits = model(tokens, encoder_input=images, encoder_mask=encoder_mask)
                tokens = torch.cat([tokens, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
                encoder_mask = torch.cat([encoder_mask, encoder_mask[:, -1:]], dim=1)
            assert torch.equal(out[row, padding:], tokens[0]) and (out[row, :padding] == 0).all()


def test_cached_generation_without_an_encoder_mask_and_up_to_max_seq_len_plus_one() -> None:
    """No encoder mask: the cross-attention cache is sized to the encoder output, here longer than the decoder's
    max_seq_len (it was sized to max_seq_len and failed). And the last new token is never fed back, so
    prompt + max_new_tokens may be max_seq_len + 1, as in torchtune."""
    from mmtrain.data.vqa import ShapesVQA, VQATokenizer

    torch.manual_seed(0)
    prompts = [ShapesVQA("validation", 2, VQATokenizer()).prompt_sample(i)[0] for i in range(2)]
    batch = padded_collate_tiled_images_and_mask(prompts, pad_direction="left")
    prompt_len = batch["tokens"].shape[1]
    model = llama3_2_vision_tiny(max_seq_len=prompt_len + 3)
    with torch.no_grad():
        encoder_len = model.encoder(**batch["encoder_input"]).shape[1]
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.fill_(0.8)
    assert encoder_len > model.decoder.max_seq_len
    kwargs = dict(max_new_tokens=4, pad_id=0, encoder_input=batch["encoder_input"], encoder_mask=None,
                  stop_early=False)
    cached = generate(model, batch["tokens"], use_cache=True, **kwargs)
    assert cached.shape == (2, prompt_len + 4)
    assert torch.equal(cached, generate(model, batch["tokens"], use_cache=False, **kwargs))
    with pytest.raises(ValueError, match="max_new_tokens=5 is more than the model's max_seq_len"):
        generate(model, batch["tokens"], **{**kwargs, "max_new_tokens": 5})


def test_next_token_samples_the_tempered_top_k_distribution() -> None:
    from mmtrain.generation import next_token

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).expand(20000, -1)
    assert torch.equal(next_token(logits), torch.zeros(20000, dtype=torch.long))  # temperature 0: argmax
    rng = torch.Generator().manual_seed(0)
    draws = next_token(logits, temperature=0.7, top_k=3, rng=rng)
    kept = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64) / 0.7  # float64 reference: softmax over the top 3
    expected = torch.exp(kept) / torch.exp(kept).sum()
    counts = torch.bincount(draws, minlength=5).double() / 20000
    assert counts[3] == counts[4] == 0
    torch.testing.assert_close(counts[:3], expected, atol=0.015, rtol=0)
    again = next_token(logits, temperature=0.7, top_k=3, rng=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_sampled_generation_is_reproducible_and_top_k_one_is_greedy() -> None:
    from mmtrain.data.vqa import ShapesVQA, VQATokenizer

    torch.manual_seed(0)
    model = llama3_2_vision_tiny()
    prompts = [ShapesVQA("validation", 3, VQATokenizer()).prompt_sample(i)[0] for i in range(3)]
    batch = padded_collate_tiled_images_and_mask(prompts, pad_direction="left")
    kwargs = dict(max_new_tokens=5, pad_id=0, encoder_input=batch["encoder_input"],
                  encoder_mask=batch["encoder_mask"], stop_early=False)
    greedy = generate(model, batch["tokens"], **kwargs)
    assert torch.equal(generate(model, batch["tokens"], temperature=1.0, top_k=1, **kwargs), greedy)
    first = generate(model, batch["tokens"], temperature=5.0, rng=torch.Generator().manual_seed(3), **kwargs)
    second = generate(model, batch["tokens"], temperature=5.0, rng=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(first, second) and not torch.equal(first, greedy)
    uncached = generate(model, batch["tokens"], temperature=5.0, rng=torch.Generator().manual_seed(3),
                        use_cache=False, **kwargs)
    assert torch.equal(uncached, first)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, batch["tokens"], temperature=-1.0, **kwargs)
