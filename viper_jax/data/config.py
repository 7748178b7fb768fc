"""Defaults of the input pipeline, as an `ml_collections.ConfigDict` consumed by `make_pipeline`."""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

# Image resizing bounds in pixels (smart_resize): transformers' processor defaults, 4..1280 merged tokens an image.
# The training pipeline's defaults, and `viper generate` / `viper eval`'s.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def get_data_config() -> ConfigDict:
    c = ConfigDict()
    # Shard files: each glob is expanded and sorted; a glob matching nothing is an error.
    c.shard_globs = ("data/viper/*.arrayrecord",)
    c.seed = 0
    c.shuffle = True
    # None repeats forever; each epoch is a fresh permutation holding every record exactly once.
    c.num_epochs = config_dict.placeholder(int)
    c.batch_size = 8
    # Drop a last, short batch (only ever happens with a finite num_epochs): keeps shapes static.
    c.drop_remainder = True
    # Static prompt lengths (left-padded). A record whose prompt exceeds the last one is skipped
    # ("too_long"). With max_pixels below, one image is at most 1280 tokens: two images plus text fit 3072.
    c.length_buckets = (512, 1024, 1536, 2048, 3072)
    # Optional static row counts for the concatenated pixel_values (empty: no padding). See Collator.
    c.patch_buckets = ()
    # Image resizing bounds in pixels (smart_resize).
    c.min_pixels = DEFAULT_MIN_PIXELS
    c.max_pixels = DEFAULT_MAX_PIXELS
    # Bad records are skipped and counted; the run fails once skipped/seen exceeds this fraction, checked
    # only after `min_seen_for_skip_check` records so that one early bad record cannot stop a run.
    c.max_skip_fraction = 0.05
    c.min_seen_for_skip_check = 100
    # Parallelism: worker processes (grain mp_prefetch; 0 = in-process) and threads per process.
    c.worker_count = 0
    c.worker_buffer_size = 2
    c.read_threads = 2
    c.read_prefetch = 16
    # Training prompt overrides, task -> template (keys of viper_common.prompts.TRAINING_PROMPTS;
    # caption_refine's template holds a `{caption}` placeholder).
    c.prompts = ConfigDict()
    return c
