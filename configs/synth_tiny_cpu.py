"""CPU demo with tiny random-init models (no downloads, gibberish outputs; see synthesis_torch/tiny_models.py).

    viper-synth tiny-models /tmp/viper_tiny
    viper-synth caption-refine --images my_images --out /tmp/viper_synth --config configs/synth_tiny_cpu.py
    viper-synth visual-ops --records /tmp/viper_synth --out /tmp/viper_synth --config configs/synth_tiny_cpu.py
    viper-synth summary /tmp/viper_synth

The model folder is $VIPER_TINY_DIR (default /tmp/viper_tiny). The settings (`tiny_config`) turn on the
lenient parser and open the difference band fully: records then show the pipeline's structure only.
"""

import os

from synthesis_torch.config import tiny_config


def get_config():
    root = os.environ.get("VIPER_TINY_DIR", "/tmp/viper_tiny")
    return tiny_config(vlm=f"{root}/vlm", t2i=f"{root}/qwen_image", editor=f"{root}/qwen_image_edit")
