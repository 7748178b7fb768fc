"""The rollout engine over a prompt batch split across JAX processes.

`generate` (engine.py) takes the whole batch as host NumPy. Here every process passes only the prompts
it read; they become one global batch (process blocks in `ProcessBlocks` order) for the same jitted
prefill and decode programs, and every process gets back the samples of its own prompts.

What the processes agree on first, through one small host allgather of metadata: the prompt width
(the largest local length bucket: every process re-pads its prompts to it, which is the bucket one
process would pick for the whole batch), whether any prompt has images, and each process's image grids
and pixel row count (pixel blocks are padded to a common size; see distributed.block_vision_inputs).
Positions (get_rope_index) are per prompt, so each process computes its own rows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from viper_jax.data.processing import bucket_for
from viper_jax.distributed import ProcessBlocks, allgather, allgather_ragged, block_vision_inputs, pad_rows
from viper_jax.models.qwen2_5_vl import Qwen2_5_VL
from viper_jax.models.qwen2_5_vl.rope_index import next_positions, prompt_positions
# The jitted programs are engine.generate's own, so both paths sample identically.
from viper_jax.rollout.engine import (RolloutConfig, RolloutResult, check_fits, decode, kv_cache_bytes, left_pad,
                                      prefill)


@dataclasses.dataclass
class GlobalPrompts:
    """This process's prompts as the global batch saw them, plus what every process agreed on."""

    input_ids: np.ndarray       # [b, W] int32, re-padded (left) to the common width W
    attention_mask: np.ndarray  # [b, W] int32
    has_images: bool            # any prompt of ANY process has images (then positions use get_rope_index)
    grids: list[np.ndarray]     # every process's image grids, in block order
    images_per_prompt: list[np.ndarray]  # every process's [b] image counts, in block order


def gather_prompts(blocks: ProcessBlocks, input_ids: Any, attention_mask: Any, image_grid_thw: Any,
          images_per_prompt: Any, buckets: tuple[int, ...], pad_id: int) -> GlobalPrompts:
    """The host allgather of prompt metadata (never pixels) and this process's re-padded prompts."""
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    grid = np.zeros((0, 3), np.int32) if image_grid_thw is None else np.asarray(image_grid_thw, np.int32).reshape(-1, 3)
    per_prompt = np.zeros(len(ids), np.int32) if images_per_prompt is None else np.asarray(images_per_prompt, np.int32)
    meta = allgather(np.asarray([ids.shape[0], ids.shape[1]], np.int32))
    if len(set(meta[:, 0].tolist())) != 1:
        raise ValueError(f"processes hold different numbers of prompts: {meta[:, 0].tolist()} (by process index)")
    width = bucket_for(int(meta[:, 1].max()), buckets, grow=False)
    ids, mask = left_pad(ids, mask, width, pad_id)
    grids = blocks.in_order(allgather_ragged(grid))
    counts = blocks.in_order(list(allgather(per_prompt)))
    return GlobalPrompts(ids, mask, any(len(g) for g in grids), grids, counts)


def generate_global(model: Qwen2_5_VL, prompts: GlobalPrompts, rng: Any, cfg: RolloutConfig, blocks: ProcessBlocks,
                    pixel_values: Any = None) -> RolloutResult:
    """`cfg.group_size` samples for each of this process's prompts; every process calls it together.

    pixel_values: this process's real patch rows (those of its grids, in order), or None without images.
    The result holds this process's rows only ([b*G, ...]); kv_cache_bytes is the whole batch's.
    """
    ids, mask = prompts.input_ids, prompts.attention_mask
    bucket = ids.shape[1]
    check_fits(model, bucket, cfg)
    pixels = vision_inputs = None
    positions = prompt_positions(ids, mask, prompts.grids[blocks.position] if prompts.has_images else None,
                                 model.config)
    if prompts.has_images:
        rows = blocks.block_rows(max(int(g.prod(axis=1).sum()) for g in prompts.grids))
        local = np.zeros((0, model.config.vision.patch_dim), np.float32) if pixel_values is None else \
            np.asarray(pixel_values, np.float32)
        pixels = blocks.put(pad_rows(local, rows))
        vision_inputs = block_vision_inputs(prompts.grids, rows, model.config.vision)
    next_pos = next_positions(positions)  # generated token i sits at next_pos + i on every axis
    cache_dtype = cfg.cache_dtype or model.dtype
    cfg = dataclasses.replace(cfg, cache_dtype=cache_dtype)
    start = time.perf_counter()
    g_mask = blocks.put(mask)
    last_logits, cache = prefill(model, blocks.put(ids), g_mask, blocks.put(positions, axis=1), pixels,
                                  vision_inputs, cfg)
    tokens, logprobs, lengths, slots = decode(model, last_logits, cache, g_mask, blocks.put(next_pos), rng, cfg,
                                              bucket)
    slots = int(np.asarray(slots.addressable_data(0)))  # a replicated scalar: the whole batch's slots
    tokens, logprobs, lengths = (blocks.local(x) for x in (tokens, logprobs, lengths))
    seconds = time.perf_counter() - start
    rows = ids.shape[0] * cfg.group_size
    return RolloutResult(tokens=tokens, lengths=lengths, logprobs=logprobs,
                         prompt_index=np.repeat(np.arange(ids.shape[0]), cfg.group_size), seconds=seconds,
                         kv_cache_bytes=kv_cache_bytes(model, rows * blocks.count, bucket + cfg.max_new_tokens,
                                                       cache_dtype), decode_slots=slots)
