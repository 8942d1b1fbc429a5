"""Llama 3.2 Vision: the tiled CLIP encoder with its projection head, the fused Llama decoder, and model builders.

``llama3_2_vision_11b`` / ``llama3_2_vision_tiny`` return a ``DeepFusionModel`` with torchtune's state-dict keys;
``count_parameters`` / ``estimate_memory`` size a run before it starts.
"""

from mmtrain.models.llama3_2_vision._component_builders import (
    llama3_2_vision_11b_encoder,
    llama3_2_vision_encoder,
    llama3_2_vision_projection_head,
)
from mmtrain.models.llama3_2_vision._convert_meta_weights import (
    load_meta_checkpoint,
    meta_to_mmtrain,
    mmtrain_to_meta,
)
from mmtrain.models.llama3_2_vision._convert_weights import hf_to_mmtrain, load_hf_checkpoint, mmtrain_to_hf
from mmtrain.models.llama3_2_vision._decoder import llama3_2_vision_decoder
from mmtrain.models.llama3_2_vision._encoder import Llama3VisionEncoder, Llama3VisionProjectionHead
from mmtrain.models.llama3_2_vision._model_builders import (
    llama3_2_vision_11b,
    llama3_2_vision_tiny,
    lora_llama3_2_vision_11b,
    lora_llama3_2_vision_tiny,
)

__all__ = [
    "Llama3VisionEncoder",
    "Llama3VisionProjectionHead",
    "hf_to_mmtrain",
    "llama3_2_vision_11b",
    "llama3_2_vision_11b_encoder",
    "llama3_2_vision_decoder",
    "llama3_2_vision_encoder",
    "llama3_2_vision_projection_head",
    "llama3_2_vision_tiny",
    "load_hf_checkpoint",
    "load_meta_checkpoint",
    "lora_llama3_2_vision_11b",
    "lora_llama3_2_vision_tiny",
    "meta_to_mmtrain",
    "mmtrain_to_hf",
    "mmtrain_to_meta",
]
