"""Prompt buckets chosen from the data (data.auto_buckets): hand-computed choices, the sampled lengths are
the pipeline's own prompt lengths, and viper train's buckets for the tiny records sit under the limit."""

from __future__ import annotations

import numpy as np

from grpo_tiny import tiny_config
from viper_jax.data import build_tiny_tokenizer, make_pipeline
from viper_jax.data.auto_buckets import choose_buckets, sample_prompt_lengths
from viper_jax.data.pipeline import resolve_shards
from viper_jax.tiny import write_tiny_records
from viper_jax.train.stage_data import stage_buckets, stage_data_config


def test_buckets_are_quantiles_of_batch_maxima_under_the_limit():
    # Every prompt 100 tokens: every batch's longest is 100 -> 128 (next multiple of 64), then the limit.
    assert choose_buckets(np.full(50, 100), 8, 512) == (128, 512)
    # 10% of prompts 300 tokens, batches of one: maxima are the lengths; quantiles 1/4..3/4 are 100, 4/4 300.
    assert choose_buckets(np.asarray([100] * 90 + [300] * 10), 1, 512) == (128, 320, 512)
    # Batches of 8: 57% of them hold a 300 (1 - 0.9^8), so the median batch needs 320 already.
    assert choose_buckets(np.asarray([100] * 90 + [300] * 10), 8, 512, count=2) == (320, 512)
    # Longer than the limit: skipped by the pipeline, so ignored; rounding never passes the limit.
    assert choose_buckets(np.asarray([500, 900]), 1, 510) == (510,)
    assert choose_buckets(np.zeros(0, np.int64), 4, 256) == (256,)
    assert choose_buckets(np.full(10, 100), 4, 512, count=0) == (512,)


def test_sampled_lengths_are_the_pipelines_prompt_lengths(tmp_path):
    shards = write_tiny_records(tmp_path / "data", per_task=6)
    tok = build_tiny_tokenizer(tmp_path / "tok")
    config = tiny_config(tmp_path / "run", tmp_path / "data")
    data = stage_data_config(config, "caption_refine", 0)
    data.batch_size, data.num_epochs, data.drop_remainder = 2, 1, True
    seen = []
    for batch in make_pipeline(data, tok, process_index=0, process_count=1):
        seen.extend(np.asarray(batch["attention_mask"]).sum(axis=1).tolist())
    ours = sample_prompt_lengths(resolve_shards(tuple(data.shard_globs)), tok, data, 1000)
    assert sorted(ours.tolist()) == sorted(seen) and len(seen) == 6
    assert sample_prompt_lengths(resolve_shards(tuple(data.shard_globs)), tok, data, 3).shape == (3,)
    assert shards  # both tasks written


def test_train_buckets_for_the_tiny_records(tmp_path):
    write_tiny_records(tmp_path / "data", per_task=8)
    tok = build_tiny_tokenizer(tmp_path / "tok")
    config = tiny_config(tmp_path / "run", tmp_path / "data")
    buckets = stage_buckets(config, tok)
    limit = max(config.data.length_buckets)
    assert buckets[-1] == limit and all(b % 64 == 0 or b == limit for b in buckets)
    longest = max(int(sample_prompt_lengths(resolve_shards(tuple(config.stages[n].data_globs)), tok, config.data,
                                            100).max()) for n in config.stage_order)
    # The tiny prompts need far less than the limit: the largest chosen bucket (the maxima's top quantile)
    # holds the longest sampled prompt and is below the limit, which stays as the last bucket.
    assert len(buckets) >= 2 and longest <= buckets[-2] < limit, (buckets, longest)
