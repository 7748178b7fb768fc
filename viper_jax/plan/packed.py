"""`viper plan` with rl.packing: the packed update's micro-batches under a length distribution, their shapes
and analytic FLOPs.

The padded update runs every row at prompt bucket + max_new_tokens whatever the lengths, so one shape and
one FLOP count describe it. Packed (train/packing.py), the micro-batches depend on the lengths: here the
trainer's own cutting (packing.cut_prompts, first_fit, row_bucket, predicted_slots) runs on lengths drawn
from a distribution, giving each micro-batch's prompts, rows and predicted-token slots. The program is
compiled once for the largest of each (every micro-batch's buffers are at most those), and the step's time
sums the micro-batches' own FLOPs.

Length distributions (`--lengths`):
  full       every prompt fills its bucket and every response runs to max_new_tokens (what the padded
             plan assumes; packing then holds one sequence a row).
  realistic  prompts of varied length: the images' tokens (and their start/end tokens) plus text drawn
             uniformly from 16 tokens up to what fills the bucket; responses long-tailed: exponential with
             mean max_new_tokens / 4, rounded up, clipped to [1, max_new_tokens] (scripts/bench_grpo.py
             --realistic draws responses the same way). Seeded (--seed), so a plan is reproducible.
Every response counts (no group dropped by rl.drop_zero_spread: rewards are not simulated).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from viper_jax.plan.workload import Shapes

LENGTHS = ("full", "realistic")


def draw_lengths(shapes: Shapes, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(real prompt tokens [B], response tokens [B * G]) of one rollout batch under `kind` (module docstring)."""
    b, g, tp, n = shapes.rollout_prompts, shapes.group_size, shapes.prompt_len, shapes.response_len
    if kind == "full":
        return np.full(b, tp), np.full(b * g, n)
    if kind != "realistic":
        raise ValueError(f"lengths: {kind!r} is not one of {LENGTHS}")
    rng = np.random.default_rng(seed)
    vision = shapes.images_per_prompt * (shapes.image_tokens + 2)  # image tokens + vision start/end
    low = min(tp, vision + 16)
    prompts = rng.integers(low, tp + 1, b)
    responses = np.clip(np.ceil(rng.exponential(n / 4, b * g)), 1, n).astype(np.int64)
    return prompts, responses


@dataclasses.dataclass(frozen=True)
class PackedMicro:
    """One packed micro-batch: what its compiled program's shapes and FLOPs depend on."""

    prompts: int      # prompts embedded (prompt_ids rows, images)
    rows: int         # packed rows of row_len tokens (after row_bucket)
    slots: int        # K: predicted-token slots (the lm_head's positions)
    sequences: int    # prompt + response sequences packed
    real_tokens: int  # their tokens (prompt + response): the useful share of rows x row_len


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    width: int                 # response width (rl.response_bucket trims it; else max_new_tokens)
    row_len: int               # prompt bucket + width
    max_rows: int              # the token budget in rows
    micros: list[PackedMicro]  # every micro-batch of one pass (ppo epoch), minibatches in order

    @property
    def largest(self) -> PackedMicro:
        """The shapes one program is compiled for: the most prompts, rows and slots of any micro-batch."""
        m = self.micros
        return PackedMicro(max(x.prompts for x in m), max(x.rows for x in m), max(x.slots for x in m),
                           max(x.sequences for x in m), max(x.real_tokens for x in m))

    @property
    def distinct_shapes(self) -> int:
        return len({(x.prompts, x.rows, x.slots) for x in self.micros})


def packed_layout(shapes: Shapes, rl: Any, batch_parts: int, prompt_lens: np.ndarray,
                  response_lens: np.ndarray) -> PackedLayout:
    """The packed micro-batches GRPOLearner._micro_batches makes of a rollout batch with these lengths."""
    from viper_jax.train.config import minibatches_per_pass
    from viper_jax.train.grpo_batch import response_mask, slices
    from viper_jax.train.packing import cut_prompts, first_fit, predicted_slots, response_width, row_bucket

    g, n = shapes.group_size, shapes.response_len
    width = response_width(response_mask(response_lens, n), rl.response_bucket) if rl.response_bucket > 0 else n
    row_len = shapes.prompt_len + width
    ranges = slices(shapes.rollout_prompts, minibatches_per_pass(rl), shapes.micro_prompts)
    budget = (ranges[0][0][1] - ranges[0][0][0]) * g  # the padded micro-batch's rows
    max_rows = max(1, rl.pack_tokens // row_len) if rl.pack_tokens > 0 else budget
    lengths = (np.repeat(prompt_lens, g) + response_lens).reshape(-1, g)
    micros = []
    for mb in ranges:
        start = mb[0][0]
        for a, b in cut_prompts(lengths[start:mb[-1][1]], row_len, max_rows):
            seqs = lengths[start + a:start + b].reshape(-1)
            rows = row_bucket(len(first_fit(seqs, row_len)), max_rows, batch_parts)
            resp = int(response_lens[(start + a) * g:(start + b) * g].sum())
            micros.append(PackedMicro(b - a, rows, predicted_slots(rows, resp, width), len(seqs), int(seqs.sum())))
    return PackedLayout(width, row_len, max_rows, micros)


def attention_keys(attention: str, length: int) -> float:
    """Keys each query attends to as a kernel runs it, on average over a row of `length`: xla (and cudnn)
    score all of them (masked, not skipped); splash skips the blocks its static causal mask empties, so a
    query block sees the blocks up to its own (segment ids mask inside the blocks it runs, skip none)."""
    if attention != "splash":
        return float(length)
    from viper_jax.models.qwen2_5_vl.attention_kernels import SPLASH_BLOCKS

    padded = -(-length // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
    block = next(size for size in SPLASH_BLOCKS if padded % size == 0)
    blocks = padded // block
    return block * (blocks + 1) / 2 * padded / length  # per real query: the padded queries' work spread over them
