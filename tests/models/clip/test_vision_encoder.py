"""clip_vision_encoder: torchtune's state-dict layout (written out from torchtune's source), strict loading, and
loading a checkpoint made for another max_num_tiles / tile size."""

import torch

from mmtrain.models.clip import clip_vision_encoder

# torchtune: clip_vision_encoder(tile_size=4, patch_size=2, embed_dim=8, num_layers=1, num_heads=2,
# max_num_tiles=2, output_cls_projection=True).state_dict().keys()
TORCHTUNE_KEYS = [
    "conv.weight",
    "ln_pre.weight", "ln_pre.bias",
    "ln_post.weight", "ln_post.bias",
    "cls_token_embedding.weight",
    "token_pos_embedding.local_token_positional_embedding",
    "token_pos_embedding.global_token_positional_embedding",
    "token_pos_embedding.gate",
    "pre_tile_pos_embed.embedding", "pre_tile_pos_embed.gate",
    "post_tile_pos_embed.embedding", "post_tile_pos_embed.gate",
    "cls_projection.weight",
    "layers.0.attn.q_proj.weight", "layers.0.attn.q_proj.bias",
    "layers.0.attn.k_proj.weight", "layers.0.attn.k_proj.bias",
    "layers.0.attn.v_proj.weight", "layers.0.attn.v_proj.bias",
    "layers.0.attn.output_proj.weight", "layers.0.attn.output_proj.bias",
    "layers.0.mlp.w1.weight", "layers.0.mlp.w1.bias",
    "layers.0.mlp.w2.weight", "layers.0.mlp.w2.bias",
    "layers.0.sa_norm.weight", "layers.0.sa_norm.bias",
    "layers.0.mlp_norm.weight", "layers.0.mlp_norm.bias",
]

TORCHTUNE_SHAPES = {
    "conv.weight": (8, 3, 2, 2),
    "cls_token_embedding.weight": (8,),
    "token_pos_embedding.local_token_positional_embedding": (5, 8),
    "token_pos_embedding.global_token_positional_embedding": (2, 2, 5, 8),
    "token_pos_embedding.gate": (1,),
    "pre_tile_pos_embed.embedding": (2, 2, 1, 8),
    "cls_projection.weight": (8, 512),
    "layers.0.mlp.w1.weight": (32, 8),
}


def _build(**overrides):
    kwargs = dict(tile_size=4, patch_size=2, embed_dim=8, num_layers=1, num_heads=2, max_num_tiles=2,
                  output_cls_projection=True)
    kwargs.update(overrides)
    return clip_vision_encoder(**kwargs)


def test_state_dict_keys_and_shapes_match_torchtune():
    sd = _build().state_dict()
    assert sorted(sd) == sorted(TORCHTUNE_KEYS)
    for key, shape in TORCHTUNE_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    single = clip_vision_encoder(tile_size=4, patch_size=2, embed_dim=8, num_layers=1, num_heads=2, max_num_tiles=1)
    keys = set(single.state_dict())
    assert "token_pos_embedding.positional_embedding" in keys
    assert not any(k.startswith(("pre_tile_pos_embed", "post_tile_pos_embed", "cls_projection")) for k in keys)


def test_torchtune_layout_state_dict_loads_strictly():
    torch.manual_seed(0)
    checkpoint = {k: torch.randn(v.shape) for k, v in _build().state_dict().items()}
    model = _build()
    model.load_state_dict(checkpoint, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key


def test_checkpoint_for_other_max_num_tiles_and_tile_size_adapts():
    src = _build(max_num_tiles=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn_like(p))
    dst = _build(max_num_tiles=2, tile_size=6)  # 3x3 patches per tile
    dst.load_state_dict(src.state_dict(), strict=True)
    assert dst.pre_tile_pos_embed.embedding.shape == (2, 2, 1, 8)
    assert dst.token_pos_embedding.global_token_positional_embedding.shape == (2, 2, 10, 8)
    assert dst.token_pos_embedding.local_token_positional_embedding.shape == (10, 8)
    # align_corners interpolation keeps the corners of the tile grid
    torch.testing.assert_close(dst.pre_tile_pos_embed.embedding[0, 0], src.pre_tile_pos_embed.embedding[0, 0])
    torch.testing.assert_close(dst.post_tile_pos_embed.embedding[1, 1], src.post_tile_pos_embed.embedding[3, 3])
    torch.testing.assert_close(dst.layers[0].attn.q_proj.weight, src.layers[0].attn.q_proj.weight)
    x, _ = dst(torch.randn(1, 1, 2, 3, 6, 6), torch.tensor([[[1, 2]]]))
    assert x.shape == (1, 1, 2, 1, 512)


def test_without_tile_pos_embed_every_tile_shares_one_token_embedding():
    torch.manual_seed(0)
    enc = clip_vision_encoder(tile_size=8, patch_size=4, embed_dim=16, num_layers=1, num_heads=2, max_num_tiles=4,
                              use_tile_pos_embed=False)
    keys = set(enc.state_dict())
    assert "token_pos_embedding.positional_embedding" in keys
    assert not any(k.startswith(("pre_tile_pos_embed", "post_tile_pos_embed")) for k in keys)
    assert not any("global" in k or "gate" in k for k in keys if k.startswith("token_pos_embedding"))
    assert enc.state_dict()["token_pos_embedding.positional_embedding"].shape == (5, 16)  # 2x2 patches + CLS
    images = torch.randn(1, 1, 4, 3, 8, 8)
    wide, tall = enc(images, aspect_ratio=torch.tensor([[[1, 4]]])), enc(images, aspect_ratio=torch.tensor([[[4, 1]]]))
    # nothing depends on the tile layout any more: the same tiles give the same tokens whatever the aspect ratio
    assert wide[0].shape == (1, 1, 4, 5, 16)
    torch.testing.assert_close(wide[0], tall[0])
    tiled = clip_vision_encoder(tile_size=8, patch_size=4, embed_dim=16, num_layers=1, num_heads=2, max_num_tiles=4)
    with torch.no_grad():
        for name, param in tiled.named_parameters():
            if "gate" in name:
                param.fill_(1.0)  # the gates start closed (0): open them so the tile layout shows
    assert not torch.allclose(tiled(images, aspect_ratio=torch.tensor([[[1, 4]]]))[0],
                              tiled(images, aspect_ratio=torch.tensor([[[4, 1]]]))[0])
