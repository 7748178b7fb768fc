"""`viper loop`'s configuration: the schema with its defaults, and config files checked against it
(unknown keys refused, as for `viper train` and `viper-synth`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ml_collections import ConfigDict

from viper_common.config_overrides import apply_overrides, load_config_file


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.workdir = ""  # required (--workdir)
    c.rounds = 1  # rounds to have finished when the loop exits (counting earlier invocations)
    c.images = ""  # folder of unlabelled images; "{round}" in it becomes the round number
    c.models = ConfigDict(dict(
        vlm="",  # round 0's synthesiser VLM and starting policy: an HF Qwen2.5-VL directory
        t2i="", editor="",  # "" = what the synthesis config names
        tiny=False))  # write tiny random models to WORK/tiny_models and use them (CPU demo and tests)
    c.synth = ConfigDict(dict(
        mode="run",  # "run": the loop runs viper-synth; "wait": a separate job writes the shards
        command="",  # "" = `python -m synthesis_torch` of this interpreter (e.g. another venv's viper-synth)
        config="",  # synthesis config file ("" = the synthesis defaults)
        overrides=(),  # "--config.a.b=v" flags for both stages
        caption_refine_overrides=(), visual_ops_overrides=(),
        num_shards=1,  # job shards per stage (run in parallel); in wait mode 0 = whatever the job used
        devices="",  # e.g. "0,1,2,3": shard i runs with CUDA_VISIBLE_DEVICES=devices[i % len]
        limit=0,  # images per round (0 = all)
        wait_timeout_s=24 * 3600.0, poll_s=30.0))
    c.train = ConfigDict(dict(
        command="",  # "" = `python -m viper_jax` of this interpreter (also runs the export)
        config="",  # viper train config file (required); its stages must be named caption_refine, visual_ops
        overrides=(),  # "--config.a.b=v" flags for viper train
        compilation_cache=True))  # JAX persistent compilation cache in WORK/jax_cache (faster resumes)
    # A stage whose synthesis made no records: "stop" the loop there (an error naming the rejects), or "skip" it in
    # that round's training (the round trains the other stage alone; status.json says so). Not ViPER any more
    # when a stage is skipped: for a synthesiser too weak for one stage, to measure the other.
    c.empty_stage = "stop"
    c.echo = True  # stream the subprocesses' output to the console (always written to R/logs/)
    return c


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ConfigDict:
    """`get_config()` of a loop config file, checked against base_config(), then `--config.a.b=v` overrides."""
    config = load_config_file(path, base_config())
    apply_overrides(config, overrides)
    return config
