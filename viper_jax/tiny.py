"""A tiny random-init Qwen2.5-VL matched to the tiny byte-level tokenizer, for the CPU demo and tests.

`write_tiny_model(dir)` writes an ordinary HF directory (config.json, model.safetensors, tokenizer files
with the chat template) that both `load_hf` and transformers load. The vocabulary is exactly the
tokenizer's (256 bytes + specials) and every special-token id in the config comes from the tokenizer,
so prompts built by the data pipeline are valid model inputs. Weights are the JAX model's own random
init (normal 0.02), so a fresh policy samples nearly uniformly over the vocabulary.

(synthesis_torch/tiny_models.py builds the PyTorch side's tiny models; viper_jax must not import it.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from viper_common.kill_points import kill_point
from viper_common.tiny_tokenizer import build_tiny_tokenizer
from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, TextConfig, VisionConfig, save_hf

# Images of at most 16 merged tokens keep the CPU demo fast (data config min_pixels/max_pixels).
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16


def tiny_model_config(tokenizer: Any, *, hidden: int = 64, layers: int = 2, vision_depth: int = 2) -> Qwen2_5_VLConfig:
    """Text: `hidden` wide, 4 heads / 2 KV heads; vision: 32 wide, 2 heads, one windowed + one full block."""
    ids = lambda t: int(tokenizer.convert_tokens_to_ids(t))
    heads = 4
    head_dim = hidden // heads
    third = head_dim // 2 // 3
    mrope = (head_dim // 2 - 2 * third, third, third)  # 2 * sum == head_dim, as MRoPE needs
    text = TextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                      max_position_embeddings=8192, rms_norm_eps=1e-6, mrope_section=mrope,
                      bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=int(tokenizer.pad_token_id))
    vision = VisionConfig(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
                          out_hidden_size=hidden, fullatt_block_indexes=(vision_depth - 1,), tokens_per_second=2)
    return Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=ids("<|image_pad|>"),
                            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)


def write_tiny_model(out_dir: str | Path, seed: int = 0, **dims: int) -> Path:
    """Writes the tiny model and its tokenizer to `out_dir` (an HF directory) and returns it."""
    tokenizer = build_tiny_tokenizer()
    return write_random_model(out_dir, tiny_model_config(tokenizer, **dims), tokenizer, seed=seed)


_SPECIAL_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def write_random_model(out_dir: str | Path, config: dict[str, Any] | Qwen2_5_VLConfig, tokenizer: Any,
                       seed: int = 0) -> Path:
    """A random-init Qwen2.5-VL of any architecture as an HF directory (config.json, safetensors,
    tokenizer files) that `viper sft` / `viper train` / transformers load.

    config: an HF config.json dict (hub flat or transformers v5 nested layout) or a Qwen2_5_VLConfig.
    tokenizer: a tokenizer directory or a loaded (fast) tokenizer; it must fit the config: every token
    id below vocab_size and the vision/pad ids the tokenizer's own (ValueError naming the field if not).
    Weights are the JAX model's init (normal(0, initializer_range), norms 1, biases 0) from `seed`.
    """
    if not hasattr(tokenizer, "convert_tokens_to_ids"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    cfg = config if isinstance(config, Qwen2_5_VLConfig) else Qwen2_5_VLConfig.from_hf_dict(config)
    if len(tokenizer) > cfg.text.vocab_size:
        raise ValueError(f"config text vocab_size {cfg.text.vocab_size} < the tokenizer's {len(tokenizer)} tokens")
    for field, token in _SPECIAL_IDS.items():
        want = tokenizer.convert_tokens_to_ids(token)
        if getattr(cfg, field) != want:
            raise ValueError(f"config {field} is {getattr(cfg, field)}, but the tokenizer's {token} is {want}")
    if tokenizer.pad_token_id is not None and cfg.text.pad_token_id not in (None, tokenizer.pad_token_id):
        raise ValueError(f"config pad_token_id is {cfg.text.pad_token_id}, the tokenizer's is {tokenizer.pad_token_id}")
    out_dir = Path(out_dir)
    model = Qwen2_5_VL(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    save_hf(model, None, out_dir)
    kill_point("tiny_model.weights_written")  # config.json and weights there, the tokenizer not yet
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def _image(seed: int, size: tuple[int, int], edit: bool = False) -> bytes:
    """A small PNG: a colour gradient with a filled ellipse (recoloured in the edited version)."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, (37 * seed) % 256)], -1)
    img = Image.fromarray(arr.astype(np.uint8))
    ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(0, 0, 255) if edit else (255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_records(out_dir: str | Path, per_task: int = 16, size: tuple[int, int] = (56, 56)) -> dict[str, Path]:
    """Writes `per_task` caption_refine and visual_ops records (small PNGs, short truths) in the layout
    synthesis produces: OUT/<task>-00000-of-00001/part-00000.arrayrecord. Returns the shard per task."""
    from viper_common import records

    out_dir = Path(out_dir)
    shards = {}
    for task in records.TASKS:
        recs = []
        for i in range(per_task):
            if task == "caption_refine":
                recs.append(records.ViperRecord(id=f"csr-{i:04d}", task=task, images=[_image(i, size)],
                                                caption=f"A gradient with a blue ellipse, picture {i}.",
                                                truth=["The ellipse is red.", f"The picture number is {i}."]))
            else:
                recs.append(records.ViperRecord(id=f"vop-{i:04d}", task=task,
                                                images=[_image(i, size), _image(i, size, edit=True)],
                                                truth=["Recolour the ellipse from red to blue."]))
        shard = out_dir / f"{task}-00000-of-00001" / f"part-00000{records.SHARD_SUFFIX}"
        shard.parent.mkdir(parents=True, exist_ok=True)
        records.write_shard(shard, recs)
        shards[task] = shard
    return shards


def write_tiny_instruct_records(out_dir: str | Path, count: int = 16, size: tuple[int, int] = (56, 56),
                                two_images: bool = True) -> Path:
    """Writes `count` instruct records (`viper sft`'s plain prompt/answer kind) to
    OUT/instruct-00000-of-00001/part-00000.arrayrecord: one image whose ellipse is red or blue (by
    parity), asked for its colour, or (records 2, 3 of every 4, with two_images) both images, asked
    what changed. Returns the shard."""
    from viper_common import records

    recs = []
    for i in range(count):
        colour = "blue" if i % 2 else "red"
        if i % 4 < 2 or not two_images:
            recs.append(records.ViperRecord(
                id=f"ins-{i:04d}", task=records.INSTRUCT, images=[_image(i, size, edit=bool(i % 2))], truth=[],
                prompt="What colour is the ellipse?",
                answer=f"<think>I look at the ellipse.</think><answer>The ellipse is {colour}.</answer>"))
        else:
            recs.append(records.ViperRecord(
                id=f"ins-{i:04d}", task=records.INSTRUCT, images=[_image(i, size), _image(i, size, edit=True)],
                truth=[], prompt="What changed from image 1 to image 2?",
                answer="<think>I compare the ellipses.</think><answer>The ellipse turned blue.</answer>"))
    shard = Path(out_dir) / "instruct-00000-of-00001" / f"part-00000{records.SHARD_SUFFIX}"
    records.write_shard(shard, recs)
    return shard


if __name__ == "__main__":  # python -m viper_jax.tiny DIR: records for the tiny CPU config
    import sys

    for task, path in write_tiny_records(sys.argv[1] if len(sys.argv) > 1 else "/tmp/viper_tiny_data").items():
        print(f"{task}: {path}")
