"""Experiment cmp2 (docs/shapeworld.md, "Does the base see what changed?"): continue the shipped base's SFT on
compare-heavy base data, to learn whether more training of the two-image skill makes its answers name the change.

    python -c "from viper_common.shapeworld.base_data import write_base_data as w; w('runs/cmp/data', n=8000,
        weights=dict(describe=.1, ask=.1, compare=.6, choose=.1, edit=.05, follow=.05), compare_lists=True,
        mcq_answer='text')"
    viper sft --config configs/world_compare_sft.py --workdir runs/cmp/sft
    python scripts/world_diagnose.py --model runs/cmp/hf --n 16 --compare 64

Everything else is configs/world_base.py's SFT (frozen vision tower, per-layer modules, 112 px images), from
assets/world_base instead of random init, with a lower learning rate and fewer focus steps: the loss on content
words alone for every step (experiment cmp1) left answers that were lists of words.
"""

import importlib.util
from pathlib import Path


def _world_base():
    spec = importlib.util.spec_from_file_location("world_base", Path(__file__).with_name("world_base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _world_base().get_config().sft
    c.model.path = "assets/world_base"
    c.model.tiny_init = False
    c.data.shard_globs = ("runs/cmp/data/*.arrayrecord",)
    c.data.min_pixels = c.data.max_pixels = 112 * 112
    c.export.hf_dir = "runs/cmp/hf"
    c.steps = 600
    c.sft.focus_steps = 200  # then every answer token, content words 8x (world_base's focus_weight)
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.checkpoint.every_steps = 200
    c.logging.progress_bar = False
    return c
