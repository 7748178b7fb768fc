"""Qwen2.5-VL in Flax NNX: a faithful port of transformers' Qwen2_5_VLForConditionalGeneration,
with HF checkpoint import/export (`load_hf`, `save_hf`)."""

from .config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from .model import Qwen2_5_VL
from .rope_index import get_rope_index, mm_token_types
from .vision import VisionInputs, prepare_vision
from .weights import load_hf, relayout_params, save_hf

__all__ = ["Qwen2_5_VLConfig", "TextConfig", "VisionConfig", "Qwen2_5_VL", "get_rope_index", "mm_token_types",
           "VisionInputs", "prepare_vision", "load_hf", "relayout_params", "save_hf"]
