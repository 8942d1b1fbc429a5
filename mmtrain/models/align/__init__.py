"""ALIGN (EfficientNet + BERT dual encoder) with HF transformers' public API and HF checkpoint interop.

``AlignConfig``/``AlignTextConfig``/``AlignVisionConfig``, ``AlignModel``/``AlignTextModel``/``AlignVisionModel``
(``from_pretrained(local_dir)``/``save_pretrained``), ``AlignProcessor``, and the config builders
``align_tiny``/``align_minilm``/``align_base``. Shapes are documented in each submodule.
"""

from mmtrain.models.align.builders import align_base, align_minilm, align_tiny
from mmtrain.models.align.configuration import AlignConfig, AlignTextConfig, AlignVisionConfig
from mmtrain.models.align.model import AlignModel, align_loss
from mmtrain.models.align.outputs import (
    AlignOutput,
    BaseModelOutputWithPooling,
    BaseModelOutputWithPoolingAndCrossAttentions,
    BaseModelOutputWithPoolingAndNoAttention,
)
from mmtrain.models.align.processing import AlignProcessor, BertTokenizer, EfficientNetImageProcessor
from mmtrain.models.align.text import AlignTextModel
from mmtrain.models.align.vision import AlignVisionModel

__all__ = [
    "AlignConfig",
    "AlignModel",
    "AlignOutput",
    "AlignProcessor",
    "AlignTextConfig",
    "AlignTextModel",
    "AlignVisionConfig",
    "AlignVisionModel",
    "BaseModelOutputWithPooling",
    "BaseModelOutputWithPoolingAndCrossAttentions",
    "BaseModelOutputWithPoolingAndNoAttention",
    "BertTokenizer",
    "EfficientNetImageProcessor",
    "align_base",
    "align_loss",
    "align_minilm",
    "align_tiny",
]
