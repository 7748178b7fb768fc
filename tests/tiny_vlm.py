"""A tiny HF Qwen2.5-VL directory whose vocabulary is the byte-level tiny tokenizer's, saved with that
tokenizer, for the end-to-end inference tests (not a test module)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from hf_tiny import build_hf_model, tiny_config_dict
from viper_jax.data import build_tiny_tokenizer


def build_tiny_vlm_dir(path: str | Path, seed: int = 0) -> Path:
    """Model + tokenizer in `path` (eager attention, fp32, re-randomised weights)."""
    from transformers import Qwen2_5_VLConfig

    path = Path(path)
    tok = build_tiny_tokenizer(path)
    ids = dict(zip(["im_end", "pad", "vstart", "vend", "image", "video"], tok.convert_tokens_to_ids(
        ["<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])))
    d = tiny_config_dict()
    d.pop("model_type")
    d["text_config"].update(vocab_size=len(tok), bos_token_id=None, eos_token_id=ids["im_end"], pad_token_id=ids["pad"])
    d.update(image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vstart"],
             vision_end_token_id=ids["vend"])
    model = build_hf_model(Qwen2_5_VLConfig(**d), seed=seed)
    model.generation_config.eos_token_id = [ids["im_end"], ids["pad"]]
    model.generation_config.pad_token_id = ids["pad"]
    model.save_pretrained(path)
    return path


def image_bytes(seed: int, size: tuple[int, int] = (56, 56), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()
