"""Property-based tests (hypothesis): the override parser round-trips values into the composed config, and
VisionCrossAttentionMask matches a plain reference on random interleavings of image and text tokens."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------------------------- override parser
@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    path = folder / "plain.yaml"
    path.write_text("seed: 0\nlr: 0.5\nname: run\nflag: false\nnested:\n  depth: 1\n")
    return path


segment = st.from_regex(r"k[a-z][a-z0-9_]{0,5}", fullmatch=True)
values = st.one_of(
    st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    st.text(alphabet=string.ascii_letters + string.digits + " _-.:/", min_size=0, max_size=12),
)


def _hydra_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + value + "'"  # quoted: always a string, whatever it looks like


@SETTINGS
@given(entries=st.lists(st.tuples(st.lists(segment, min_size=1, max_size=3), values), min_size=1, max_size=3,
                        unique_by=lambda entry: entry[0][0]))
def test_added_keys_round_trip(config_file, entries):
    from omegaconf import OmegaConf

    from mmtrain.config import load

    overrides = [f"+{'.'.join(path)}={_hydra_text(value)}" for path, value in entries]
    cfg = load(ROOT / "recipes" / "contrastive.py", config_file, overrides)
    for path, value in entries:
        got = OmegaConf.select(cfg, ".".join(path))
        assert type(got) is type(value) and got == value, (overrides, path, got)
    assert cfg.seed == 0 and cfg.nested.depth == 1  # untouched keys stay


@SETTINGS
@given(seed=st.integers(min_value=0, max_value=2**31), lr=st.floats(min_value=1e-9, max_value=10.0),
       depth=st.integers(min_value=-5, max_value=5), name=st.text(alphabet=string.ascii_lowercase, min_size=1,
                                                                 max_size=8))
def test_changed_keys_round_trip(config_file, seed, lr, depth, name):
    from mmtrain.config import load

    cfg = load(ROOT / "recipes" / "contrastive.py", config_file,
               [f"seed={seed}", f"lr={lr!r}", f"nested.depth={depth}", f"name='{name}'", "~flag"])
    assert (cfg.seed, cfg.lr, cfg.nested.depth, cfg.name) == (seed, lr, depth, name)
    assert "flag" not in cfg


# ------------------------------------------------------------------------------------ VisionCrossAttentionMask
IMAGE = 99


def _reference_masks(tokens, tiles, tokens_per_tile):
    """Plain rule: image k (its token at p) is seen by text positions p .. e-1, where e is the first image token
    after the run of image tokens that starts at p (or the end); each mask has tiles[k] * tokens_per_tile columns."""
    positions = [i for i, t in enumerate(tokens) if t == IMAGE]
    masks = []
    for k, p in enumerate(positions):
        end = p + 1
        while end < len(tokens) and tokens[end] == IMAGE:
            end += 1
        while end < len(tokens) and tokens[end] != IMAGE:
            end += 1
        mask = torch.zeros(len(tokens), tiles[k] * tokens_per_tile, dtype=torch.bool)
        for t in range(len(tokens)):
            mask[t, :] = p <= t < end
        masks.append(mask)
    return masks


@SETTINGS
@given(tokens=st.lists(st.sampled_from([1, 2, 3, IMAGE]), min_size=1, max_size=30), data=st.data(),
       patch=st.sampled_from([2, 4]))
def test_cross_attention_mask_matches_reference(tokens, data, patch):
    from mmtrain.modules.transforms import VisionCrossAttentionMask

    tile = 8
    tokens_per_tile = (tile // patch) ** 2 + 1
    n_images = tokens.count(IMAGE)
    tiles = data.draw(st.lists(st.integers(1, 3), min_size=n_images, max_size=n_images))
    images = [torch.zeros(n, 3, tile, tile) for n in tiles]
    transform = VisionCrossAttentionMask(tile_size=tile, patch_size=patch, image_token_id=IMAGE)
    out = transform({"tokens": list(tokens), "encoder_input": {"images": images}})
    expected = _reference_masks(tokens, tiles, tokens_per_tile)
    assert len(out["encoder_mask"]) == n_images
    for got, want in zip(out["encoder_mask"], expected):
        assert got.dtype == torch.bool and got.shape == want.shape
        assert torch.equal(got, want)


@SETTINGS
@given(tokens=st.lists(st.sampled_from([1, IMAGE]), min_size=1, max_size=20), extra=st.sampled_from([-1, 1]))
def test_cross_attention_mask_refuses_token_image_mismatch(tokens, extra):
    from mmtrain.errors import DataError
    from mmtrain.modules.transforms import VisionCrossAttentionMask

    n_images = tokens.count(IMAGE) + extra
    if n_images < 0:
        return
    transform = VisionCrossAttentionMask(tile_size=8, patch_size=4, image_token_id=IMAGE)
    with pytest.raises(DataError, match="does not match the number of images"):
        transform({"tokens": tokens, "encoder_input": {"images": [torch.zeros(1, 3, 8, 8)] * n_images}})
