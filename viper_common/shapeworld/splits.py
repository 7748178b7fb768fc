"""The world's seed ranges, in one place: every scene the project draws comes from one of these ranges, and
the ranges are disjoint, so the benchmark never shares a scene with training or synthesis data.

A seed seeds both the scene sampler and the renderer (`np.random.default_rng(seed)`). Users of a range take
consecutive seeds from its start; `seed_block` splits a range into equal blocks (one per benchmark category,
one per data-generation worker, ...).
"""

from __future__ import annotations

SEED_RANGES: dict[str, range] = {
    "base_train": range(0, 100_000_000),              # the base model's general-skill SFT data
    "synth": range(100_000_000, 200_000_000),         # source images for ViPER's data synthesis
    "val": range(900_000_000, 901_000_000),           # benchmark validation split (choosing settings)
    "test": range(950_000_000, 951_000_000),          # the held-out benchmark
}


def seed_block(split: str, block: int, block_size: int) -> range:
    """Block `block` (0-based) of `block_size` consecutive seeds of a split; an error if it leaves the range."""
    if split not in SEED_RANGES:
        raise KeyError(f"unknown split {split!r}; known: {sorted(SEED_RANGES)}")
    full = SEED_RANGES[split]
    start = full.start + block * block_size
    if block < 0 or block_size <= 0 or start + block_size > full.stop:
        raise ValueError(f"block {block} of size {block_size} leaves split {split!r} ({full})")
    return range(start, start + block_size)
