"""ViPER data synthesis in PyTorch (transformers + diffusers): the GPU side of the loop.

Stage 1 (`caption_refine`): image -> VLM caption -> Qwen-Image reconstruction from the caption alone ->
the VLM lists the caption's errors and omissions -> `caption_refine` records.
Stage 2 (`visual_ops`): stage-1 records -> rule-based hard entities -> typed edit instructions from the
VLM -> an image editor (Qwen-Image-Edit by default) -> difference-band filter -> `visual_ops` records.

This package never imports JAX (nor `viper_jax`): synthesis hosts install only the `synth` extra.
Records follow `viper_common.records`, which the JAX trainer reads.
"""
