"""ViPER self-evolution with Qwen2.5-VL-7B-Instruct: rounds of GPU synthesis -> training -> HF export.

On one 8-GPU host that both synthesises and trains (each step its own process):

    viper loop --config configs/loop_7b.py --workdir /ckpt/viper7b_loop --images /data/unlabelled \
        --config.models.vlm=/models/Qwen2.5-VL-7B-Instruct

With synthesis on a separate GPU cluster (a shared filesystem between it and the trainer): the loop writes
the exact viper-synth commands for each round to WORK/round_R/synth/REQUEST.json and waits for the
job shards' manifests:

    viper loop --config configs/loop_7b.py --workdir /ckpt/viper7b_loop --images /data/unlabelled \
        --wait_for_shards --config.synth.num_shards=64

Round 0 synthesises with the Instruct model; round r+1 with round r's exported policy, which is also where
round r+1's training starts. `{round}` in --images gives each round its own image folder.
"""

from pathlib import Path

from viper_jax.loop.config import base_config

CONFIGS = Path(__file__).resolve().parent


def get_config():
    c = base_config()
    c.rounds = 3
    c.models.vlm = "/models/Qwen2.5-VL-7B-Instruct"
    c.models.t2i = "/models/Qwen-Image"
    c.models.editor = "/models/Qwen-Image-Edit"
    c.synth.config = str(CONFIGS / "synth_default.py")
    c.synth.num_shards = 8  # one process per GPU, in parallel
    c.synth.devices = "0,1,2,3,4,5,6,7"
    c.synth.poll_s = 60.0
    c.train.config = str(CONFIGS / "qwen2_5_vl_7b.py")
    c.echo = True
    return c
