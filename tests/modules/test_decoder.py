"""The Llama 3.2 Vision decoder (self-attention + gated cross-attention layers) against a plain float64 reference."""

import math

import pytest
import torch

from mmtrain.models.llama3_2_vision._decoder import llama3_2_vision_decoder, scale_hidden_dim_for_mlp
from mmtrain.modules.decoder import TransformerDecoder


def rms(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_ref(x, theta, positions):
    """x (b, s, h, d); rotate pairs (2i, 2i+1) by pos * theta_i, written with complex numbers."""
    xc = torch.complex(x[..., 0::2], x[..., 1::2])
    angles = positions.double()[:, None] * theta[None, :]
    out = xc * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.stack([out.real, out.imag], -1).flatten(3)


def attention_ref(q, k, v, keep):
    """q (b, s, h, d), k/v (b, t, h, d), keep bool (b, s, t) -> (b, s, h*d)."""
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    out = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)
    return out.flatten(2)


def swiglu(x, sd, p):
    a = x @ sd[p + "w1.weight"].T
    return (a * torch.sigmoid(a) * (x @ sd[p + "w3.weight"].T)) @ sd[p + "w2.weight"].T


def reference_decoder(sd, tokens, enc, enc_mask, *, n_layers, interval, n_heads, n_kv, vocab, theta):
    b, s = tokens.shape
    emb = torch.cat([sd["tok_embeddings.weight"], sd["tok_embeddings.fusion_embedding.weight"]])
    h = emb[tokens]
    hd = h.shape[-1] // n_heads
    rep = n_heads // n_kv
    pos = torch.arange(s)
    causal = torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)

    def heads(x, n):
        return x.view(x.shape[0], x.shape[1], n, hd)

    for i in range(n_layers):
        p = f"layers.{i}."
        if (i + 1) % interval == 0:
            f = p + "fusion_layer."
            x = rms(h, sd[f + "ca_norm.scale"], 1e-6)
            q = rms(heads(x @ sd[f + "attn.q_proj.weight"].T, n_heads), sd[f + "attn.q_norm.scale"])
            k = rms(heads(enc @ sd[f + "attn.k_proj.weight"].T, n_kv), sd[f + "attn.k_norm.scale"])
            v = heads(enc @ sd[f + "attn.v_proj.weight"].T, n_kv)
            k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
            rows_seeing_nothing = ~enc_mask.any(-1, keepdim=True)
            a = attention_ref(q, k, v, enc_mask | rows_seeing_nothing) @ sd[f + "attn.output_proj.weight"].T
            a = a.masked_fill(rows_seeing_nothing, 0)
            h = h + a * torch.tanh(sd[f + "ca_scale.scale"])
            m = swiglu(rms(h, sd[f + "mlp_norm.scale"], 1e-6), sd, f + "mlp.").masked_fill(rows_seeing_nothing, 0)
            h = h + m * torch.tanh(sd[f + "mlp_scale.scale"])
        x = rms(h, sd[p + "sa_norm.scale"])
        q = rope_ref(heads(x @ sd[p + "attn.q_proj.weight"].T, n_heads), theta, pos)
        k = rope_ref(heads(x @ sd[p + "attn.k_proj.weight"].T, n_kv), theta, pos)
        v = heads(x @ sd[p + "attn.v_proj.weight"].T, n_kv)
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        h = h + attention_ref(q, k, v, causal) @ sd[p + "attn.output_proj.weight"].T
        h = h + swiglu(rms(h, sd[p + "mlp_norm.scale"]), sd, p + "mlp.")
    return rms(h, sd["norm.scale"]) @ sd["output.weight"].T


CFG = dict(vocab_size=50, num_layers=4, fusion_interval=2, num_special_tokens=3, num_heads=4, num_kv_heads=2,
           embed_dim=32, max_seq_len=64, encoder_max_seq_len=16, rope_base=10_000, intermediate_dim=48)


def _randomize(model: torch.nn.Module) -> None:
    # Non-trivial norms and open gates, so every term of the reference is exercised.
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.copy_(0.5 + torch.rand_like(p))


def test_fused_decoder_matches_float64_reference() -> None:
    torch.manual_seed(0)
    decoder = llama3_2_vision_decoder(**CFG)
    _randomize(decoder)
    decoder = decoder.double()
    tokens = torch.tensor([[1, 50, 5, 7, 9, 11, 13], [51, 2, 4, 50, 8, 10, 12]])  # 50, 51: fusion tokens
    enc = torch.randn(2, 6, 32, dtype=torch.float64)
    enc_mask = torch.zeros(2, 7, 6, dtype=torch.bool)
    enc_mask[0, 1:, :3] = True  # first text token sees no image: the cross-attention must skip it
    enc_mask[1, :, 3:] = True
    enc_mask[1, 3:, :3] = True
    out = decoder(tokens, encoder_input=enc, encoder_mask=enc_mask)
    theta = decoder.layers[0].attn.pos_embeddings._frequencies()
    sd = {k: v.detach() for k, v in decoder.state_dict().items()}
    ref = reference_decoder(sd, tokens, enc, enc_mask, n_layers=4, interval=2, n_heads=4, n_kv=2, vocab=50,
                            theta=theta)
    assert out.shape == (2, 7, 50)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_decoder_without_encoder_input_skips_cross_attention() -> None:
    torch.manual_seed(0)
    decoder = llama3_2_vision_decoder(**CFG)
    _randomize(decoder)
    decoder = decoder.double()
    tokens = torch.randint(0, 50, (1, 5))
    sd = {k: v.detach() for k, v in decoder.state_dict().items()}
    # No image anywhere: fully masked rows are the same as no encoder input.
    ref = reference_decoder(sd, tokens, torch.zeros(1, 2, 32, dtype=torch.float64),
                            torch.zeros(1, 5, 2, dtype=torch.bool), n_layers=4, interval=2, n_heads=4, n_kv=2,
                            vocab=50, theta=decoder.layers[0].attn.pos_embeddings._frequencies())
    torch.testing.assert_close(decoder(tokens).double(), ref, atol=1e-5, rtol=1e-5)


def test_decoder_is_causal() -> None:
    torch.manual_seed(0)
    decoder = llama3_2_vision_decoder(**CFG)
    tokens = torch.randint(0, 50, (1, 8))
    changed = tokens.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 50
    torch.testing.assert_close(decoder(tokens)[:, :5], decoder(changed)[:, :5])


def test_cached_decoding_takes_masks_over_the_whole_cache_length() -> None:
    """torchtune's convention (mask rows over the full cache length) and mmtrain's (over the positions cached so
    far) give the same logits: columns past the cached positions are cropped."""
    torch.manual_seed(0)
    decoder = llama3_2_vision_decoder(**CFG).eval()
    tokens = torch.randint(0, 50, (1, 6))
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None]
    logits = []
    for full_width in (False, True):
        decoder.setup_caches(1, torch.float32, decoder_max_seq_len=8)
        with torch.no_grad():
            width = 8 if full_width else 5
            prefill = decoder(tokens[:, :5], mask=causal[:, :5, :width], input_pos=torch.arange(5)[None])
            width = 8 if full_width else 6
            step = decoder(tokens[:, 5:], mask=causal[:, 5:6, :width], input_pos=torch.tensor([[5]]))
        logits.append(torch.cat([prefill, step], dim=1))
        decoder.delete_caches()
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    with torch.no_grad():  # and both are the uncached causal pass
        torch.testing.assert_close(logits[0], decoder(tokens), rtol=1e-5, atol=1e-5)


def test_switched_off_caches_are_neither_read_nor_grown() -> None:
    """torchtune's disable_kv_cache sets ``cache_enabled = False`` on the attention modules: the forward is the
    uncached one and the caches keep what they held (mmtrain read and appended to them anyway)."""
    torch.manual_seed(0)
    decoder = llama3_2_vision_decoder(**CFG).eval()
    first, second = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 6))
    decoder.setup_caches(1, torch.float32, decoder_max_seq_len=16)
    attentions = [m for m in decoder.modules() if hasattr(m, "kv_cache") and m.kv_cache is not None]
    with torch.no_grad():
        decoder(first)
        sizes = [int(m.kv_cache.size) for m in attentions]
        for module in attentions:
            module.cache_enabled = False
        assert not decoder.caches_are_enabled()
        switched_off = decoder(second)
        for module in attentions:
            module.cache_enabled = True
        assert decoder.caches_are_enabled()
        assert [int(m.kv_cache.size) for m in attentions] == sizes
        decoder.delete_caches()
        torch.testing.assert_close(switched_off, decoder(second), rtol=0, atol=0)


def test_decoder_rejects_too_long_input_and_single_layer_needs_count() -> None:
    decoder = llama3_2_vision_decoder(**{**CFG, "max_seq_len": 4})
    with pytest.raises(ValueError, match="max_seq_len"):
        decoder(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_layers"):
        TransformerDecoder(tok_embeddings=torch.nn.Embedding(3, 4), layers=torch.nn.Identity(), max_seq_len=4,
                           num_heads=1, head_dim=4, norm=torch.nn.Identity(), output=torch.nn.Identity())


def test_scale_hidden_dim_for_mlp_llama_values() -> None:
    assert scale_hidden_dim_for_mlp(4096) == 11008  # Llama 2 7B's SwiGLU width
    assert scale_hidden_dim_for_mlp(32, multiple_of=16) == 96
