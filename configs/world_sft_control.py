"""The SFT control of issue 18 (the paper's "+ Viper10K SFT" row) in ShapeWorld: `viper sft` from the base on the
records ViPER's round 0 synthesised (both tasks mixed), with the GRPO run's budget.

    viper sft --config configs/world_sft_control.py --workdir runs/reproduce/controls/seed0/sft \
        --config.model.path=runs/reproduce/base/base_hf \
        --config.data.shard_globs='("R/synth/caption_refine-*/part-*.arrayrecord", "R/synth/visual_ops-*/part-*.arrayrecord")' \
        --config.export.hf_dir=runs/reproduce/controls/seed0/sft/export

(R = runs/reproduce/viper_seed0/round_000; scripts/reproduce.py sets all of these, plus steps, batch size and
seed.) The budget is configs/world_grpo.py's: as many optimizer updates as GRPO steps (12 + 12, one update each)
over as many prompts (rl.prompts_per_step = 8 per step), the same optimizer (lr 5e-5, 2 warmup steps, constant,
no weight decay) and the whole model trained, as GRPO trains it. The answer a record teaches is
`<think></think><answer>` + its truth sentences, one per line (sft.think, sft.truth_joiner). Settings of the
model and the data follow configs/world_base.py's SFT (per-layer modules, 112 px images = 16 visual tokens).
"""

from viper_jax.sft.config import base_config


def get_config():
    c = base_config()
    c.steps = 24  # = world_grpo's stages.caption_refine.steps + stages.visual_ops.steps
    c.model.scan_layers = False  # per-layer modules: faster steps for a small model on CPU
    c.model.tiny_init = False
    c.data.min_pixels = c.data.max_pixels = 112 * 112
    c.data.batch_size = 8  # = world_grpo's rl.prompts_per_step
    c.sft.images_per_batch = 16  # one or two images per record: one compiled program per length bucket
    # prompt + answer: a caption_refine prompt is 130-220 world tokens, an answer a few short sentences
    c.data.length_buckets = (192, 256, 320)
    c.data.read_threads = 1
    c.optim.learning_rate = 5e-5  # world_grpo's
    c.optim.warmup_steps = 2
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    c.checkpoint.every_steps = 12
    c.checkpoint.keep = 2
    c.logging.every_steps = 4
    c.logging.progress_bar = False
    return c
