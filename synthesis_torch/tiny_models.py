"""Tiny random-init components, written as ordinary model directories and loaded BY PATH like the real ones.

For the tests and the project's CPU demo (no downloads): `write_tiny_models(root)` creates
    root/vlm              Qwen2.5-VL (about 0.3 M parameters) + byte-level tokenizer + processor files
    root/qwen_image       QwenImagePipeline (diffusers' own tiny test configuration)
    root/qwen_image_edit  QwenImageEditPipeline (same, plus its Qwen2VLProcessor)
The tokenizer is byte level (256 byte symbols, no merges) plus Qwen's special tokens, so any text encodes;
the pipelines' text encoders are tiny Qwen2.5-VLs whose special-token ids match this tokenizer.

Honest limits. The weights are random: captions, critiques and instructions are meaningless. To keep them
printable (not arbitrary bytes, which are often invalid UTF-8) the VLM's output layer is zero except for
the rows of lower-case letters, space, comma, period and newline, and its language-model matrices are
re-drawn at a larger scale than the default init (which makes every output one repeated letter), so it
writes varied letter soup, split into lines, that never stops early (end-of-text logit is 0, below the
letters' maxima). Records from these models only
demonstrate structure and accounting; the tiny config also turns on `filter.lenient` (see parsing.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from viper_common.tiny_tokenizer import QWEN2_VL_CHAT_TEMPLATE as CHAT_TEMPLATE, build_tiny_tokenizer

TINY_MIN_PIXELS, TINY_MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16  # at most 16 vision tokens per image


def byte_level_tokenizer():
    """The shared byte-level Qwen2 tokenizer (viper_common.tiny_tokenizer), with the real chat template."""
    return build_tiny_tokenizer()


def _processor(cls, tok):
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return cls(image_processor=Qwen2VLImageProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS),
               tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def _qwen_vl_config(tok, hidden: int, intermediate: int, heads: int, kv_heads: int, mrope: list[int],
                    vision_hidden: int, vision_heads: int):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                  "<|vision_start|>", "<|vision_end|>")}
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=vision_heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, out_hidden_size=hidden, fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)


def write_tiny_vlm(path: Path, seed: int = 0) -> Path:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok = byte_level_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(
        _qwen_vl_config(tok, 64, 128, 4, 2, [2, 3, 3], vision_hidden=32, vision_heads=2))
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = bytes_to_unicode()
    printable = [tok.convert_tokens_to_ids(symbols[ord(ch)]) for ch in "abcdefghijklmnopqrstuvwxyz ,.\n"]
    with torch.no_grad():  # see the module docstring: varied, printable letter soup instead of random bytes
        g = torch.Generator().manual_seed(seed)
        for name, p in model.model.language_model.named_parameters():
            if p.dim() == 2:  # default init (std 0.02) makes every output the same repeated letter
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.2))
        weight = model.lm_head.weight
        rows = torch.randn(len(printable), weight.shape[1], generator=g)
        weight.zero_()
        weight[printable] = rows
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    _processor(Qwen2_5_VLProcessor, tok).save_pretrained(path)
    return path


def _pipeline_components(tok, seed: int) -> dict:
    """diffusers' tests/pipelines/qwenimage tiny components, with a text encoder matching `tok`."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        _qwen_vl_config(tok, 16, 16, 2, 2, [1, 1, 2], vision_hidden=16, vision_heads=2))
    return dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                text_encoder=text_encoder, tokenizer=tok)


def write_tiny_t2i(path: Path, seed: int = 1) -> Path:
    from diffusers import QwenImagePipeline

    QwenImagePipeline(**_pipeline_components(byte_level_tokenizer(), seed)).save_pretrained(path)
    return path


def write_tiny_editor(path: Path, seed: int = 2) -> Path:
    from diffusers import QwenImageEditPipeline
    from transformers import Qwen2VLProcessor

    tok = byte_level_tokenizer()
    components = _pipeline_components(tok, seed)
    QwenImageEditPipeline(processor=_processor(Qwen2VLProcessor, tok), **components).save_pretrained(path)
    return path


def write_tiny_models(root: str | Path) -> dict[str, str]:
    """Writes the three tiny model directories under `root`; returns {"vlm", "t2i", "editor"} -> path."""
    root = Path(root)
    paths = {"vlm": write_tiny_vlm(root / "vlm"), "t2i": write_tiny_t2i(root / "qwen_image"),
             "editor": write_tiny_editor(root / "qwen_image_edit")}
    out = {k: str(v) for k, v in paths.items()}
    (root / "tiny_models.json").write_text(json.dumps(out, indent=1))
    return out
