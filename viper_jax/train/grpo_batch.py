"""Host-side (NumPy) assembly of the GRPO update's inputs from a prompt batch and its rollouts.

Layout of one update slice of b prompts x G samples (rows of a group consecutive, as the rollout
engine returns them):

  prompt_ids / prompt_mask [b, Tp]   left-padded prompts, ONCE per prompt
  pixel_values [P, patch_dim]        the b prompts' image patch rows, ONCE per prompt
  vision_inputs                      prepare_vision of their grids
  positions [3, b*G, Tp + N]         MRoPE positions of prompt + response, per row
  tokens / resp_mask [b*G, N]        sampled responses; mask = before-and-including the end token
  advantages [b*G], old_logp [b*G, N]               (ref_logp, with rl.kl_coef, is added by the step)

The training forward embeds each prompt once (vision tower included) and repeats the embeddings G
times, instead of repeating pixel rows G times: the vision tower runs b, not b*G, times, and its
gradient is the sum over the group, as it would be with repeated pixels.

Positions: the prompt's come from get_rope_index exactly as in the rollout engine; response token i
sits at max(prompt positions) + 1 + i on all three axes, which is what get_rope_index gives over
prompt + response (tests check this), so the update sees the positions the sampler used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from viper_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, prepare_vision
from viper_jax.models.qwen2_5_vl.rope_index import next_positions, prompt_positions


@dataclasses.dataclass
class RolloutBatch:
    """B prompts and their B*G sampled responses, everything the update needs (NumPy)."""

    prompt_ids: np.ndarray         # [B, Tp] int32, left-padded
    prompt_mask: np.ndarray        # [B, Tp] int32
    pixel_values: np.ndarray | None  # [P, patch_dim] float32 (real rows only) or None
    image_grid_thw: np.ndarray | None  # [I, 3] int32
    images_per_prompt: np.ndarray  # [B] int32
    tokens: np.ndarray             # [B*G, N] int32
    resp_mask: np.ndarray          # [B*G, N] float32: 1 on response tokens that count (0 for dropped groups)
    advantages: np.ndarray         # [B*G] float32
    old_logp: np.ndarray           # [B*G, N] float32, under the sampling temperature
    group_size: int

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0]


def response_mask(lengths: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """[R, N] float32: 1 for the first `lengths[r]` tokens of each row (the end token included)."""
    return (np.arange(max_new_tokens)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def full_positions(prompt_pos: np.ndarray, num_new: int, group_size: int) -> np.ndarray:
    """[3, b*G, Tp + N]: prompt positions, then max + 1 + i for response token i, rows repeated G times."""
    resp = next_positions(prompt_pos)[:, None] + np.arange(num_new, dtype=prompt_pos.dtype)[None, :]
    full = np.concatenate([prompt_pos, np.broadcast_to(resp[None], (3, *resp.shape))], axis=2)
    return np.repeat(full, group_size, axis=1).astype(np.int32)


def update_inputs(batch: RolloutBatch, start: int, stop: int, config: Qwen2_5_VLConfig) -> dict[str, Any]:
    """The jitted update's input dict for prompts [start, stop) of `batch` (and their rows)."""
    grid = None
    out: dict[str, Any] = {}
    if batch.image_grid_thw is not None and batch.image_grid_thw.shape[0] > 0:
        first_image = np.concatenate([[0], np.cumsum(batch.images_per_prompt)])
        grid = batch.image_grid_thw[first_image[start]:first_image[stop]]
        first_row = np.concatenate([[0], np.cumsum(batch.image_grid_thw.prod(axis=1))])
        out["pixel_values"] = batch.pixel_values[first_row[first_image[start]]:first_row[first_image[stop]]]
        out["vision_inputs"] = prepare_vision(grid, config.vision)
    out.update(row_inputs(batch, start, stop, grid, config))
    return out


def row_inputs(batch: RolloutBatch, start: int, stop: int, grid: np.ndarray | None,
               config: Qwen2_5_VLConfig) -> dict[str, Any]:
    """update_inputs without the images: prompts [start, stop), their rows' responses, and positions from
    get_rope_index over `grid` (text positions for None). Several processes pass the grid the rollout used
    (empty for a process without images in a batch with some), so positions are the sampler's."""
    g = batch.group_size
    ids, mask = batch.prompt_ids[start:stop], batch.prompt_mask[start:stop]
    rows = slice(start * g, stop * g)
    return dict(prompt_ids=ids, prompt_mask=mask,
                positions=full_positions(prompt_positions(ids, mask, grid, config), batch.tokens.shape[1], g),
                tokens=batch.tokens[rows], resp_mask=batch.resp_mask[rows], advantages=batch.advantages[rows],
                old_logp=batch.old_logp[rows])


def slices(num_prompts: int, num_minibatches: int, micro_prompts: int) -> list[list[tuple[int, int]]]:
    """Prompt ranges: minibatches (one optimizer update each) of micro-batches (one forward/backward each)."""
    per_mb = num_prompts // num_minibatches
    micro = micro_prompts or per_mb
    return [[(a, a + micro) for a in range(m * per_mb, (m + 1) * per_mb, micro)] for m in range(num_minibatches)]
