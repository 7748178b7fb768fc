"""Prompt length buckets chosen from the data, so that nobody has to fit `data.length_buckets` by hand.

A batch is left-padded to the smallest bucket that holds its LONGEST prompt, and the update and the rollout's
prefill run on that width. What matters is therefore the distribution of batch maxima, not of single prompts:
with the config's (512, 1024, ...) a data set of ~700-token prompts pads every batch to 1024. Here a sample of
records (spread evenly over the shards, the same on every process: no communication needed) is turned into
prompts exactly as the pipeline does, batches are drawn from it, and the buckets are quantiles of their maxima,
rounded up to a multiple. The config's largest bucket stays the last one: it is the limit (a longer prompt is
skipped as too_long), and it catches the rare batch longer than any the sample produced.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from viper_common import prompts as prompts_lib


def sample_prompt_lengths(paths: Sequence[str], tokenizer: Any, data_config: Any, count: int) -> np.ndarray:
    """Prompt lengths (tokens, vision placeholders expanded) of up to `count` records spread evenly over the
    shards `paths`; records the pipeline would skip (bad bytes, bad image, bad prompt) are left out."""
    import grain

    from viper_jax.data.processing import RecordProcessor, Skipped, make_image_processor

    source = grain.sources.ArrayRecordDataSource(list(paths))
    if len(source) == 0 or count <= 0:
        return np.zeros((0,), np.int64)
    overrides = data_config.prompts.to_dict() if hasattr(data_config.prompts, "to_dict") else \
        dict(data_config.prompts or {})
    processor = RecordProcessor(tokenizer, make_image_processor(data_config.min_pixels, data_config.max_pixels),
                                prompts_lib.merged(prompts_lib.TRAINING_PROMPTS, overrides), max_length=1 << 30)
    lengths = []
    for i in np.unique(np.linspace(0, len(source) - 1, min(count, len(source))).astype(np.int64)):
        record = processor.decode(source[int(i)])
        prompt = record if isinstance(record, Skipped) else processor.prompt(record)
        if not isinstance(prompt, Skipped):
            lengths.append(len(prompt.input_ids))
    return np.asarray(lengths, np.int64)


def choose_buckets(lengths: np.ndarray, batch_size: int, limit: int, count: int = 4, multiple: int = 64,
                   draws: int = 512, seed: int = 0) -> tuple[int, ...]:
    """Up to `count` buckets from the maxima of `draws` batches of `batch_size` prompts drawn from `lengths`
    (quantiles 1/count ... 1 of those maxima, rounded up to `multiple`), then `limit` (the config's largest
    bucket, never exceeded). Deterministic in its inputs, so every process and every resume agree."""
    lengths = np.asarray(lengths, np.int64)
    lengths = lengths[lengths <= limit]  # longer ones are skipped by the pipeline anyway
    if len(lengths) == 0 or count <= 0:
        return (int(limit),)
    rng = np.random.default_rng(seed)
    maxima = rng.choice(lengths, size=(draws, max(int(batch_size), 1)), replace=True).max(axis=1)
    picks = np.quantile(maxima, np.arange(1, count + 1) / count, method="higher")
    rounded = {min(int(-(-int(p) // multiple) * multiple), int(limit)) for p in picks}
    return tuple(sorted(rounded | {int(limit)}))

