"""CPU demo: a random-init tiny Qwen2.5-VL (written to <workdir>/tiny_model on first run) and the byte-level
tokenizer, both stages on a few synthetic records, in a few minutes on two cores.

    python -m viper_jax.tiny /tmp/viper_tiny_data          # 16 records per task (or your own synthesis output)
    viper train --config configs/tiny.py --workdir /tmp/viper_tiny_run
    viper convert orbax-to-hf --ckpt /tmp/viper_tiny_run/checkpoints --out /tmp/viper_tiny_hf \
        --tokenizer_dir /tmp/viper_tiny_run/tiny_model

The records folder is $VIPER_TINY_DATA (default /tmp/viper_tiny_data). The policy is random, so rewards
are near 0; `--config.stages.caption_refine.reward=toy_letters` (and the same for visual_ops) gives a
reward a tiny model can learn.
"""

import os

from viper_jax.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS
from viper_jax.train.config import base_config, stage

SHORT_FORMAT = "Answer as <think>...</think><answer>...</answer>."


def get_config():
    c = base_config()
    data = os.environ.get("VIPER_TINY_DATA", "/tmp/viper_tiny_data")
    c.model.tiny_init = True  # model.path "" -> <workdir>/tiny_model
    c.mesh.fsdp = -1  # every local device
    c.data.min_pixels, c.data.max_pixels = TINY_MIN_PIXELS, TINY_MAX_PIXELS
    # Byte-level tokens make the real training prompts ~600 tokens; short ones keep the demo fast.
    c.data.prompts.caption_refine = 'Caption: "{caption}" Correct it. ' + SHORT_FORMAT
    c.data.prompts.visual_ops = "List the edits from image 1 to image 2. " + SHORT_FORMAT
    c.data.length_buckets = (192, 256, 384)
    c.data.read_threads = 1
    c.stages.caption_refine = stage("caption_refine", (f"{data}/caption_refine-*/part-*.arrayrecord",), 4)
    c.stages.visual_ops = stage("visual_ops", (f"{data}/visual_ops-*/part-*.arrayrecord",), 4)
    c.rollout.max_new_tokens = 24
    c.rl.prompts_per_step = 4
    c.rl.group_size = 4
    c.rl.num_minibatches = 2
    c.optim.learning_rate = 1e-2  # a tiny random model; 3e-2 learns toy_letters in ~10 steps
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.0
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 2
    return c
