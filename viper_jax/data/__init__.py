"""Input pipeline: ViPER records (viper_common.records) -> Qwen2.5-VL model inputs, via Grain.

Importing this package (and its `config` and `processing` modules) does not import jax.
The Grain-based names (`make_pipeline`, `DataPipeline`, ...) load on first access: Grain itself
imports jax.
"""

from __future__ import annotations

import importlib
from typing import Any

from viper_jax.data.config import get_data_config
from viper_jax.data.processing import (Collator, Example, Prompt, PromptError, RecordProcessor, Skipped, bucket_for,
                                       build_prompt, make_image_processor, vision_tokens)
from viper_common.tiny_tokenizer import QWEN2_VL_CHAT_TEMPLATE, build_tiny_tokenizer

_LAZY = {name: "viper_jax.data.pipeline" for name in (
    "DataPipeline", "SkipStats", "TooManySkippedError", "make_pipeline", "resolve_shards")}

__all__ = sorted(["Collator", "Example", "Prompt", "PromptError", "QWEN2_VL_CHAT_TEMPLATE", "RecordProcessor", "Skipped",
                  "bucket_for", "build_prompt", "build_tiny_tokenizer", "make_image_processor", "vision_tokens",
                  "get_data_config", *_LAZY])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
