"""The ShapeWorld base model (viper_jax/world/base.py): a tiny Qwen2.5-VL trained from random init with
`viper sft` on the world's general skills, on this 2-core CPU.

    viper world base --workdir runs/world_base --config configs/world_base.py

Sizes were chosen by measured `viper sft` throughput on this machine (see docs/shapeworld.md); lengths
cover the longest base example (a five-object description, about 200 tokens with its 16 image tokens).
"""

from viper_jax.world.base import base_config


def get_config():
    c = base_config()
    c.world.n_train = 24000
    s = c.sft
    s.steps = 900
    s.model.scan_layers = False  # per-layer modules: faster steps for a small model on CPU
    s.data.batch_size = 32
    s.data.length_buckets = (96, 128, 160, 224)
    s.data.read_threads = 1
    s.optim.learning_rate = 2e-3
    s.optim.warmup_steps = 30
    s.optim.schedule = "cosine"
    s.optim.final_lr_fraction = 0.05
    s.optim.weight_decay = 0.01
    s.checkpoint.every_steps = 100
    s.checkpoint.keep = 2
    s.logging.every_steps = 25
    return c
