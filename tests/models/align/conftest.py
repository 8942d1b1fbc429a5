"""Shared tiny ALIGN configurations for the ALIGN tests."""

from __future__ import annotations

import pytest

from mmtrain.models.align import AlignConfig

TINY_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=40, type_vocab_size=2)
TINY_VISION = dict(image_size=32, width_coefficient=0.5, depth_coefficient=1.5, kernel_sizes=[3, 5, 3],
                   in_channels=[32, 16, 24], out_channels=[16, 24, 64], strides=[1, 2, 2],
                   num_block_repeats=[1, 1, 2], expand_ratios=[1, 6, 4], depthwise_padding=[2], hidden_dim=64,
                   drop_connect_rate=0.2)


def tiny_config_dict() -> dict:
    # vision output width = round_filters(64 * 0.5) = 32 = projection_dim
    return dict(text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION), projection_dim=32,
                temperature_init_value=0.5)


@pytest.fixture
def tiny_config() -> AlignConfig:
    return AlignConfig(**tiny_config_dict())
