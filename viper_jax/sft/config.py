"""`viper sft` configuration: the schema with its defaults, loading and validation.

A config file's `get_config()` returns `base_config()` with changes (configs/sft_tiny.py). Every key a
file or a `--config.a.b=value` override sets must exist here: a typo is refused with the known keys.
The model, mesh, optimizer, checkpoint and logging sections are `viper train`'s (train/config.py), so
both trainers read a model and write checkpoints the same way.
"""

from __future__ import annotations

from pathlib import Path

from ml_collections import ConfigDict

from viper_common import config_overrides
from viper_common.config_overrides import ConfigError, apply_overrides  # noqa: F401 (re-exported)
from viper_jax.train import config as train_config


def base_config() -> ConfigDict:
    grpo = train_config.base_config()
    c = ConfigDict()
    c.workdir = ""  # checkpoints/, metrics.jsonl, tensorboard/, config.json (required)
    c.steps = 100  # optimizer updates, one per batch
    c.compile_cache_dir = ""  # viper_jax/compile_cache.py: "" = $VIPER_JAX_CACHE_DIR, else ~/.cache/viper_jax/jax_cache; "off"
    # model.path: HF directory or Orbax checkpoint; model.tiny_init writes the tiny model there first.
    c.model = grpo.model
    c.mesh = grpo.mesh
    c.sharding_rules = grpo.sharding_rules
    # data.shard_globs: ArrayRecord shards of caption_refine, visual_ops and/or instruct records (mixed is
    # fine); data.batch_size rows per step; data.num_epochs None repeats with a new shuffle per epoch.
    # data.length_buckets bound prompt + answer; a longer record is a counted skip (too_long). data.seed
    # is the run's only seed: the update uses no randomness (no dropout; the model comes from model.path).
    c.data = grpo.data
    c.data.shard_globs = ()
    c.sft = ConfigDict()
    # A ViPER record's answer: <think>{think}</think><answer>{truth sentences joined by truth_joiner}</answer>.
    c.sft.think = ""
    c.sft.truth_joiner = "\n"  # one sentence per line: the reward's sentence splitter keeps them apart
    # Pad every batch's images to this many (0 = off): one compiled program per length bucket when records
    # have one or two images (batch_size * 2 covers any batch of them). See step.model_inputs.
    c.sft.images_per_batch = 0
    c.sft.logit_chunk = 0  # positions per lm_head chunk (rematerialised); 0 = all at once
    # A curriculum over instruct records' answer_focus tokens (the words that state what the images show):
    # the first focus_steps updates put the loss on them only; after that every answer token counts and focus
    # tokens weigh focus_weight. A fresh decoder trained on whole answers fits the text and ignores the image.
    c.sft.focus_steps = 0
    c.sft.focus_weight = 1.0
    c.optim = grpo.optim
    c.optim.learning_rate = 1e-5
    c.checkpoint = grpo.checkpoint
    c.logging = grpo.logging
    c.export = grpo.export  # export.hf_dir: the final model as an HF directory
    return c


# data.prompts (task -> template) is free-form: the data config checks its tasks.
OPEN_SECTIONS = {"data.prompts": None}


def check_keys(config: ConfigDict) -> None:
    """Every key of `config` must exist in base_config()."""
    config_overrides.check_keys(config, base_config(), OPEN_SECTIONS)


def load_config(path: str | Path) -> ConfigDict:
    """`get_config()` of a Python file, checked against this schema (unknown keys refused)."""
    return config_overrides.load_config_file(path, base_config(), OPEN_SECTIONS)


def validate(config: ConfigDict) -> None:
    """Values that would fail later (or silently do the wrong thing) are refused now, by key."""
    check_keys(config)
    train_config.validate_shared(config)
    for ok, key, message in [(config.steps >= 1, "steps", "must be positive"),
                             (len(config.data.shard_globs) > 0, "data.shard_globs", "is empty: no training data"),
                             (config.data.batch_size >= 1, "data.batch_size", "must be positive"),
                             (config.sft.logit_chunk >= 0, "sft.logit_chunk", "must be >= 0 (0 = off)"),
                             (config.sft.images_per_batch >= 0, "sft.images_per_batch", "must be >= 0 (0 = off)"),
                             (0 <= config.sft.focus_steps <= config.steps, "sft.focus_steps",
                              f"must be in [0, steps={config.steps}]"),
                             (config.sft.focus_weight > 0, "sft.focus_weight", "must be positive")]:
        if not ok:
            raise ConfigError(f"config {key}: {message}")
