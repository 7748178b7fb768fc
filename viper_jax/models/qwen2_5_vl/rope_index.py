"""3D (temporal, height, width) rope positions: NumPy copy of `Qwen2_5_VLModel.get_rope_index`.

Copied from transformers 5.24 (the version installed and tested against). Points that differ from
older releases and are kept here on purpose:
- Tokens are grouped by `mm_token_type_ids` (0 text, 1 image, 2 video); when it is not given it is
  derived from the image/video placeholder ids, which is what the processor returns.
- Video temporal positions are `int(k * tokens_per_second * second_per_grid_t)` computed in float32
  (truncation, no int cast of second_per_grid_t as in v4.57/v5.0).
- After an image/video block the next text position is `start + max(h, w) / merge`, ignoring the
  temporal extent, while `rope_deltas` uses the global maximum.
- Pad positions (attention_mask == 0) are 0.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from .config import Qwen2_5_VLConfig


def mm_token_types(input_ids: Any, config: Qwen2_5_VLConfig) -> np.ndarray:
    """0 for text, 1 for image placeholders, 2 for video placeholders (the processor's mm_token_type_ids)."""
    ids = np.asarray(input_ids)
    return np.where(ids == config.image_token_id, 1, np.where(ids == config.video_token_id, 2, 0)).astype(np.int32)


def _vision_positions(start: int, grid: np.ndarray, merge: int, interval: np.float32) -> np.ndarray:
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    # torch: (arange(t) * time_interval).long() runs in float32 and truncates.
    pos_t = (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64)
    tt, hh, ww = np.meshgrid(pos_t, np.arange(h) + start, np.arange(w) + start, indexing="ij")
    out = np.stack([tt, hh, ww]).reshape(3, -1)
    out[0] += start
    return out


def get_rope_index(input_ids: Any, attention_mask: Any, image_grid_thw: Any, video_grid_thw: Any,
                   second_per_grid_ts: Any, config: Qwen2_5_VLConfig,
                   mm_token_type_ids: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (position_ids [3, B, T] int32, rope_deltas [B] int32).

    Image grids and video grids (and `second_per_grid_ts`, one per video) are consumed in order over
    the whole batch, sample by sample, as in transformers. A token generated after the prompt at
    sequence index i (no padding counted) has position i + rope_deltas on all three axes.
    """
    ids = np.asarray(input_ids)
    types = mm_token_types(ids, config) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    merge = config.vision.spatial_merge_size
    grids = {1: iter(np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else None,
             2: iter(np.asarray(video_grid_thw).reshape(-1, 3)) if video_grid_thw is not None else None}
    seconds = iter(np.asarray(second_per_grid_ts, np.float32).reshape(-1) if second_per_grid_ts is not None
                   else np.ones(ids.shape[1], np.float32))
    position_ids = np.zeros((3, *ids.shape), np.int64)
    deltas = np.zeros(ids.shape[0], np.int64)
    for b in range(ids.shape[0]):
        row_types = types[b][mask[b]]
        pieces, cur = [], 0
        for kind, group in itertools.groupby(row_types.tolist()):
            n = len(list(group))
            if kind == 0:
                pieces.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
                cur += n
                continue
            it = grids[kind]
            if it is None:
                raise ValueError(f"sample {b} has {'image' if kind == 1 else 'video'} tokens but no grid_thw was given")
            grid = next(it)
            interval = np.float32(config.vision.tokens_per_second) * next(seconds) if kind == 2 else np.float32(1)
            block = _vision_positions(cur, grid, merge, interval)
            if block.shape[1] != n:
                raise ValueError(f"sample {b}: {n} placeholder tokens but grid {grid.tolist()} needs {block.shape[1]}")
            pieces.append(block)
            cur += max(int(grid[1]), int(grid[2])) // merge
        if not pieces:
            continue
        pos = np.concatenate(pieces, axis=1)
        position_ids[:, b, mask[b]] = pos
        deltas[b] = pos.max() + 1 - len(row_types)
    return position_ids.astype(np.int32), deltas.astype(np.int32)


def text_positions(input_ids: Any) -> np.ndarray:
    """What transformers uses when no image/video grid is given: arange(T) on all three axes for
    every row (padding is not skipped). [3, B, T] int32."""
    b, t = np.asarray(input_ids).shape
    return np.broadcast_to(np.arange(t, dtype=np.int32), (3, b, t)).copy()


def prompt_positions(input_ids: Any, attention_mask: Any, image_grid_thw: Any, config: Any) -> np.ndarray:
    """[3, B, T] positions of (left-padded) prompts: get_rope_index with images, text_positions without.
    The rollout (one process or several) and the GRPO update use exactly these for the same prompts."""
    if image_grid_thw is None:
        return text_positions(input_ids)
    return get_rope_index(input_ids, attention_mask, np.asarray(image_grid_thw), None, None, config)[0]


def next_positions(positions: np.ndarray) -> np.ndarray:
    """[B]: where generated token 0 sits on every MRoPE axis, max(prompt positions) + 1 (HF's rope_deltas);
    token i sits at this + i."""
    return positions.max(axis=(0, 2)) + 1

