"""One ViPER round on a CPU with tiny random-init models (tests, `viper demo`), no downloads:

    viper loop --config configs/loop_tiny.py --workdir /tmp/viper_loop --images my_images

The tiny VLM from `viper-synth tiny-models` (written to WORK/tiny_models) synthesises the data and is the
starting policy, so the export of round r is round r+1's synthesiser. Its outputs are letter soup and it
cannot write the <think>/<answer> format, so the ViPER reward stays at 0: the round shows the plumbing,
not learning (`--config.train.overrides='("--config.stages.caption_refine.reward=toy_letters",
"--config.stages.visual_ops.reward=toy_letters")'` gives a reward a tiny model can learn).
"""

from pathlib import Path

from viper_jax.loop.config import base_config

CONFIGS = Path(__file__).resolve().parent


def get_config():
    c = base_config()
    c.models.tiny = True
    c.synth.config = str(CONFIGS / "synth_tiny_cpu.py")
    c.train.config = str(CONFIGS / "tiny.py")
    c.train.overrides = (
        "--config.stages.caption_refine.steps=3",
        "--config.stages.visual_ops.steps=3",
        "--config.data.length_buckets=(512, 768)",  # byte-level prompts with 16-token images: ~480 tokens
        "--config.rl.num_minibatches=1",
        "--config.checkpoint.every_steps=3",
        "--config.logging.progress_bar=False",
    )
    return c
