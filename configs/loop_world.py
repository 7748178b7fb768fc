"""ViPER's self-evolution in ShapeWorld: the base VLM (`viper world base`) synthesises both stages' data with the
simulated text-to-image model and editor, is trained with GRPO on it, and its export is the next round's
synthesiser.

    viper world images --out runs/world_images/round_0 --n 64 --block 0     # one block of synth seeds a round
    viper loop --config configs/loop_world.py --workdir runs/world_loop \
        --images 'runs/world_images/round_{round}' --config.models.vlm=runs/world_base/base_hf
"""

from pathlib import Path

from viper_jax.loop.config import base_config

CONFIGS = Path(__file__).resolve().parent


def get_config():
    c = base_config()
    c.synth.config = str(CONFIGS / "synth_shapeworld.py")
    c.models.t2i = c.models.editor = "shapeworld"
    c.train.config = str(CONFIGS / "world_grpo.py")
    # The world base is too weak a synthesiser for stage 2 (runs rq7-rq9: its edit instructions rarely name a real
    # object, and its own check rejects the edits that do): such a round trains stage 1 alone, and the report
    # says so, rather than stopping the experiment.
    c.empty_stage = "skip"
    return c
