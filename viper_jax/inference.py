"""Inference on a checkpoint: loading (HF directory or Orbax), prompts from images + text, batched greedy
or sampled generation through the rollout engine, decoding. `viper generate` is `run_generate`; `viper
eval` (viper_jax.evaluation) builds on the same pieces.

Prompts are `viper_jax.data.build_prompt`'s (the training pipeline's: identical to transformers'
Qwen2.5-VL processor on the chat template) and batches are the pipeline's `Collator` (left padding to a
length bucket), so what a checkpoint sees here is exactly what it saw in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from viper_common.image_checks import check_usable
from viper_jax.data.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS  # noqa: F401 (the pipeline's bounds)
from viper_jax.data.processing import (Collator, Example, Prompt, VisionTokens, build_prompt, make_image_processor,
                                       vision_tokens)
from viper_jax.dtypes import DTYPE_NAMES, dtype_named

# Prompt length buckets (left padding; one XLA compile per bucket and image-grid set).
DEFAULT_BUCKETS = (128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192)


@dataclasses.dataclass
class Session:
    """A loaded model with everything needed to prompt it."""

    model: Any  # viper_jax.models.qwen2_5_vl.Qwen2_5_VL
    tokenizer: Any
    image_processor: Any
    tokens: VisionTokens
    eos_token_ids: tuple[int, ...]
    pad_token_id: int

    def prompt(self, images: Sequence[Any], text: str) -> Prompt:
        return build_prompt(self.tokenizer, self.image_processor, images, text, self.tokens)

    def decode(self, tokens: np.ndarray, length: int) -> str:
        """One generated row -> text, without the end token and special tokens."""
        ids = [int(t) for t in tokens[:int(length)]]
        if ids and ids[-1] in self.eos_token_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_path: str | Path, tokenizer_dir: str | Path | None = None) -> Any:
    from transformers import AutoTokenizer

    source = Path(tokenizer_dir) if tokenizer_dir else Path(model_path)
    has_files = any((source / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if not has_files:
        hint = " (an Orbax checkpoint holds no tokenizer: pass --tokenizer_dir)" if not tokenizer_dir else ""
        raise FileNotFoundError(f"no tokenizer files in {source}{hint}")
    return AutoTokenizer.from_pretrained(str(source))


def end_token_ids(tokenizer: Any, *dirs: str | Path | None) -> tuple[int, ...]:
    """The tokenizer's eos, Qwen's `<|im_end|>` / `<|endoftext|>`, and generation_config.json's eos ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.append(int(tid))
    for d in dirs:
        f = Path(d) / "generation_config.json" if d else None
        if f is not None and f.exists():
            eos = json.loads(f.read_text()).get("eos_token_id")
            ids += [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return tuple(dict.fromkeys(ids))


def load_session(model_path: str | Path, tokenizer_dir: str | Path | None = None, *, dtype: str = "float32",
                 step: int | None = None, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Session:
    import jax.numpy as jnp

    from viper_jax.convert import load_model

    tokenizer = load_tokenizer(model_path, tokenizer_dir)  # first: fails fast, before loading weights
    tokens = vision_tokens(tokenizer)
    model = load_model(model_path, dtype=dtype_named(dtype), step=step)
    eos = end_token_ids(tokenizer, model_path, tokenizer_dir)
    if not eos:
        raise ValueError("no end token: the tokenizer has no eos and no generation_config.json gives one")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    vocab = model.config.text.vocab_size
    if max(tokens.image, tokens.video, tokens.start, tokens.end) >= vocab:
        raise ValueError(f"tokenizer's vision token ids {tokens} are outside the model's vocabulary ({vocab}): "
                         f"wrong --tokenizer_dir?")
    return Session(model, tokenizer, make_image_processor(min_pixels, max_pixels), tokens, eos, int(pad))


def collate(session: Session, prompts: Sequence[Prompt], buckets: Sequence[int]) -> dict[str, Any]:
    """Left-padded batch through the training pipeline's Collator; no images -> pixel inputs None."""
    examples = [Example(id=str(i), task="", truth=(), input_ids=p.input_ids, pixel_values=p.pixel_values,
                        image_grid_thw=p.image_grid_thw) for i, p in enumerate(prompts)]
    has_images = [len(p.image_grid_thw) > 0 for p in prompts]
    if any(has_images) and not all(has_images):
        raise ValueError("a batch mixes prompts with and without images")
    batch = Collator(tuple(buckets), session.pad_token_id, session.tokens.image, session.tokens.video)(examples)
    if not all(has_images):
        batch["pixel_values"] = batch["image_grid_thw"] = None
    return batch


def rollout_config(session: Session, max_new_tokens: int, buckets: Sequence[int], samples: int = 1,
                   temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Any:
    from viper_jax.rollout.engine import RolloutConfig
    from viper_jax.rollout.sampling import SamplingConfig

    # Buckets past the model's positions are replaced by the longest prompt it can still answer.
    limit = session.model.config.text.max_position_embeddings - int(max_new_tokens)
    if limit <= 0:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt within the model's "
                         f"{limit + int(max_new_tokens)} positions")
    fits = sorted({int(b) for b in buckets if int(b) <= limit})
    if not fits or max(buckets) > limit:
        fits.append(limit)
    return RolloutConfig(max_new_tokens=int(max_new_tokens), prompt_buckets=tuple(fits),
                         max_cache_len=max(fits) + int(max_new_tokens), eos_token_ids=session.eos_token_ids,
                         pad_token_id=session.pad_token_id, group_size=int(samples),
                         sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p))


def generate_batch(session: Session, prompts: Sequence[Prompt], cfg: Any, seed: int = 0) -> Any:
    """`RolloutResult` for a list of prompts (rows of one prompt's group consecutive)."""
    import jax

    from viper_jax.rollout.engine import generate

    batch = collate(session, prompts, cfg.prompt_buckets)
    return generate(session.model, batch["input_ids"], batch["attention_mask"], jax.random.key(seed), cfg,
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])


def open_image(path: str | Path) -> Any:
    from PIL import Image

    img = Image.open(path)
    img.load()
    try:
        check_usable(img)  # 16-bit or animated: the image processor's RGB conversion would read it wrongly
    except ValueError as e:
        raise ValueError(f"image {path}: {e}") from None
    return img


# --------------------------------------------------------------------------------------- viper generate

def add_generate_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a response for images + a prompt with the JAX rollout engine")
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several, in order)")
    p.add_argument("--prompt", required=True, help="the user's text (after the images)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="responses to sample (they share one prefill)")
    p.add_argument("--warmup", action="store_true", help="generate once before the timed run (excludes compilation)")
    p.add_argument("--output_json", default=None, help="also write prompt/response token ids and timings here")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF Qwen2.5-VL directory or Orbax checkpoint directory")
    p.add_argument("--tokenizer_dir", default=None, help="tokenizer directory (default: --model; required for Orbax)")
    p.add_argument("--step", type=int, default=None, help="Orbax checkpoint step (default: latest)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="parameter and compute dtype")
    p.add_argument("--min_pixels", type=int, default=DEFAULT_MIN_PIXELS, help="image resize lower bound (pixels)")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="image resize upper bound (pixels)")
    p.add_argument("--prompt_buckets", type=lambda s: tuple(int(x) for x in s.split(",")), default=DEFAULT_BUCKETS,
                   help="comma-separated prompt length buckets (left padding; one compile per bucket)")


def session_from_args(args: argparse.Namespace) -> Session:
    return load_session(args.model, args.tokenizer_dir, dtype=args.dtype, step=args.step,
                        min_pixels=args.min_pixels, max_pixels=args.max_pixels)


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    session = session_from_args(args)
    images = [open_image(p) for p in args.image]
    prompt = session.prompt(images, args.prompt)
    cfg = rollout_config(session, args.max_new_tokens, args.prompt_buckets, args.samples, args.temperature,
                         args.top_p, args.top_k)
    if len(prompt.input_ids) > cfg.prompt_buckets[-1]:
        raise SystemExit(f"prompt is {len(prompt.input_ids)} tokens, longer than the largest bucket "
                         f"{cfg.prompt_buckets[-1]}: lower --max_pixels or add a larger --prompt_buckets entry")
    if args.warmup:
        generate_batch(session, [prompt], cfg, args.seed)
    result = generate_batch(session, [prompt], cfg, args.seed)
    responses = [session.decode(result.tokens[r], result.lengths[r]) for r in range(len(result.tokens))]
    for r, text in enumerate(responses):
        if len(responses) > 1:
            print(f"--- sample {r} ({int(result.lengths[r])} tokens)")
        print(text)
    generated = int(result.lengths.sum())
    note = "" if args.warmup else ", includes XLA compilation; --warmup to exclude it"
    print(f"[{len(prompt.input_ids)} prompt tokens, {len(images)} image(s); {generated} tokens generated in "
          f"{result.seconds:.2f} s = {result.tokens_per_second:.1f} tokens/s{note}; "
          f"KV cache {result.kv_cache_bytes / 2**20:.2f} MiB ({result.kv_cache_bytes} bytes)]", file=sys.stderr)
    out = {"prompt_ids": prompt.input_ids.tolist(), "image_grid_thw": prompt.image_grid_thw.tolist(),
           "responses": responses,
           "response_ids": [result.tokens[r, :int(result.lengths[r])].tolist() for r in range(len(responses))],
           "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
           "kv_cache_bytes": int(result.kv_cache_bytes)}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(out, indent=1))
    return out
