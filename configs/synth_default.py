"""Synthesis settings for the real models on a GPU: Qwen2.5-VL-7B-Instruct, Qwen-Image, Qwen-Image-Edit.

The values are defined in `synthesis_torch/config.py` (so an installed package has them without this
folder) and documented there field by field. Copy this file to make a run's config, change what you need
below `c = default_config()`, and pass it with `viper-synth ... --config my_synth.py`; single fields can
also be overridden on the command line with `--config.a.b=value`.
"""

from synthesis_torch.config import default_config


def get_config():
    c = default_config()
    # Examples of what a run usually sets:
    # c.models.vlm = "/models/Qwen2.5-VL-7B-Instruct"   # or a policy exported by `viper convert orbax-to-hf`
    # c.models.t2i = "/models/Qwen-Image"
    # c.models.editor = "/models/Qwen-Image-Edit"
    # c.t2i.offload = c.editor.offload = "none"          # on GPUs with memory for everything (e.g. H200)
    return c
