"""`viper sft` on CPU: a random-init tiny Qwen2.5-VL (written to <workdir>/tiny_model on first run) and the
byte-level tokenizer, on the tiny ViPER records and instruct records, in about a minute on two cores.

    python -c "from viper_jax.tiny import *; write_tiny_records('/tmp/viper_sft_data'); \\
               write_tiny_instruct_records('/tmp/viper_sft_data')"
    viper sft --config configs/sft_tiny.py --workdir /tmp/viper_sft_run

The records folder is $VIPER_SFT_DATA (default /tmp/viper_sft_data); every shard under it is read.
"""

import os

from viper_jax.sft.config import base_config
from viper_jax.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS

SHORT_FORMAT = "Answer as <think>...</think><answer>...</answer>."


def get_config():
    c = base_config()
    data = os.environ.get("VIPER_SFT_DATA", "/tmp/viper_sft_data")
    c.steps = 30
    c.model.tiny_init = True  # model.path "" -> <workdir>/tiny_model
    c.mesh.fsdp = -1  # every local device
    c.data.shard_globs = (f"{data}/*/part-*.arrayrecord",)
    c.data.batch_size = 4
    c.data.min_pixels, c.data.max_pixels = TINY_MIN_PIXELS, TINY_MAX_PIXELS
    # Byte-level tokens make the real training prompts ~600 tokens; short ones keep the run fast.
    c.data.prompts.caption_refine = 'Caption: "{caption}" Correct it. ' + SHORT_FORMAT
    c.data.prompts.visual_ops = "List the edits from image 1 to image 2. " + SHORT_FORMAT
    c.data.length_buckets = (192, 256, 384)
    c.data.read_threads = 1
    c.sft.images_per_batch = 8  # 4 rows of 1 or 2 images: one vision program, not five
    c.optim.learning_rate = 1e-2  # a tiny random model (3e-3 and 2e-2 learn slower over 30 steps)
    c.optim.warmup_steps = 3
    c.optim.schedule = "cosine"
    c.optim.final_lr_fraction = 0.1
    c.optim.weight_decay = 0.0
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    return c
