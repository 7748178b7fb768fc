"""ViPER's GRPO in ShapeWorld on this CPU: stage 1 (caption_refine) then stage 2 (visual_ops) on the records
the ShapeWorld base synthesised itself (configs/synth_shapeworld.py), starting from that base.

    viper loop --config configs/loop_world.py --workdir runs/world_loop --images runs/world_images/round_{round}

`viper loop` sets model.path (the round's synthesiser, i.e. the base or the previous round's export) and the
stages' data globs. The reward is the paper's (0.05 format + 0.95 sentence precision at tau 0.85) with
all-MiniLM-L6-v2. Sizes: 112 px images (16 visual tokens each), world-tokenizer prompts of 130-260 tokens,
answers of a few short sentences.
"""

from viper_jax.train.config import base_config, stage


def get_config():
    c = base_config()
    c.model.scan_layers = False  # per-layer modules: faster steps for a small model on CPU
    pixels = 112 * 112
    c.data.min_pixels = c.data.max_pixels = pixels
    c.data.length_buckets = (160, 192, 256, 320)  # a caption_refine prompt holds a caption of up to 160 tokens
    c.data.read_threads = 1
    c.stages.caption_refine = stage("caption_refine", (), 12)
    c.stages.visual_ops = stage("visual_ops", (), 12)
    c.rollout.max_new_tokens = 64
    # The base answers ViPER's (new to it) prompts with the answer block and then goes on writing instead of ending
    # its turn (run rq10: format rate 0 at every step); the response ends at the block's end, as with vLLM's stop.
    c.rollout.stop_strings = ("</answer>",)
    c.rl.prompts_per_step = 8
    c.rl.group_size = 5  # the paper's
    c.optim.learning_rate = 5e-5
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.0
    c.checkpoint.every_steps = 6
    c.checkpoint.keep = 2
    c.logging.progress_bar = False
    return c
