"""`viper sft`: supervised fine-tuning on `viper train`'s stack, checkpointed and exactly resumable.

The same pieces as the GRPO trainer: model setup and mesh sharding (train/model_source.py), fp32 master
state and its donated jitted update (train/state.py), start or resume (train/resume.py), optimizer
(train/optim.py), the Grain pipeline over ArrayRecord shards with SFT records and batches (data.py), Orbax
checkpoints (checkpoint.py), MetricsLogger (metrics.jsonl, TensorBoard, progress bar) and the HF export (save_hf).

A step: next batch -> answer-token loss (only focus tokens for the first sft.focus_steps) and update
(step.py) -> metrics -> a checkpoint every `checkpoint.every_steps` steps and at the last. A restart with the same workdir resumes from the latest
checkpoint: parameters, optimizer state, step, skip counters and the data iterator's position (record
and epoch, with its shuffle) are restored; the update uses no randomness, so a killed and resumed run
ends bit-identical to an uninterrupted one (same mesh and machine). One JAX process.

train_meta (JSON, in each checkpoint): step, updates (applied), skipped (non-finite), data_seed.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from viper_common.cli_errors import debugging
from viper_common.kill_points import kill_point
from viper_jax import checkpoint, compile_cache
from viper_jax.data.pipeline import TooManySkippedError
from viper_jax.sft.config import ConfigError, validate
from viper_jax.sft.data import SFTCollator, SFTProcessor
from viper_jax.sft.step import make_sft_step, model_inputs
from viper_jax.train.metrics import MetricsLogger
from viper_jax.train.model_source import setup_model
from viper_jax.train.optim import make_optimizer
from viper_jax.train.resume import CheckpointRestoreError, ModelMismatchError, init_or_restore
from viper_jax.train.stage_data import data_pipeline
from viper_jax.train.state import train_state_shardings
from viper_jax.train.trainer import log_to_console, write_config

CONSOLE_KEYS = ("loss", "answer_tokens", "grad_norm", "lr", "tokens_per_s", "seconds")

__all__ = ["train", "run_cli", "ConfigError"]


def make_sft_pipeline(config: ConfigDict, tokenizer: Any) -> Any:
    """The Grain pipeline of SFT batches; a glob matching nothing or shards without records name the key."""
    processor = functools.partial(SFTProcessor, think=str(config.sft.think), truth_joiner=str(config.sft.truth_joiner))
    return data_pipeline(config.data, tokenizer, "config data.shard_globs", processor_cls=processor,
                         collator_cls=SFTCollator)


def check_data(config: ConfigDict) -> None:
    """The shard globs must match files before anything slow starts (loading, compiling)."""
    from viper_jax.data.pipeline import resolve_shards

    try:
        resolve_shards(tuple(config.data.shard_globs))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config data.shard_globs: {e}") from None


def train(config: ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) SFT for `config.steps` updates; returns the last step's metrics plus `step`."""
    validate(config)
    check_data(config)
    if jax.process_count() > 1:
        raise ConfigError("viper sft runs in one JAX process (its devices form the mesh)")
    workdir = Path(config.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(workdir, config)

    setup = setup_model(config, workdir)
    total = int(config.steps)
    optimizer, schedule = make_optimizer(config.optim, total)
    shardings = train_state_shardings(optimizer, setup.abstract_params, setup.param_shardings)
    ckpt = checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=config.checkpoint.keep, keep_steps=(total,),
                                        async_save=config.checkpoint.async_save)
    state, meta, data_state = init_or_restore(ckpt, setup, config, optimizer, shardings)
    step = int(meta["step"]) if meta else 0
    pipeline = make_sft_pipeline(config, setup.tokenizer)
    if data_state is not None:
        pipeline.set_state(data_state)
    update = make_sft_step(setup.graphdef, optimizer, shardings, setup.mesh, setup.rules, int(config.sft.logit_chunk))

    log = MetricsLogger(workdir, start_step=step, total_steps=total, tensorboard=config.logging.tensorboard,
                        progress_bar=config.logging.progress_bar, console_every=config.logging.every_steps,
                        desc="sft", console_keys=CONSOLE_KEYS, bar_key="loss")
    if meta:
        log.message(f"resumed from {ckpt.directory}/{step} (step {step} of {total})")
    metrics: dict[str, Any] = {}
    first = True
    try:
        while step < total:
            t0 = time.perf_counter()
            try:
                batch = next(pipeline)
            except StopIteration:
                raise ConfigError(f"the data ran out after {step} steps (data.num_epochs={config.data.num_epochs}): "
                                  f"raise data.num_epochs (None repeats) or lower steps") from None
            lr = float(schedule(int(state.step)))  # the rate this update applies
            focus_only = step < int(config.sft.focus_steps)  # the curriculum's first phase
            try:
                inputs = model_inputs(batch, setup.config, int(config.sft.images_per_batch),
                                      focus_only=focus_only,
                                      focus_weight=float(config.sft.focus_weight))
            except ValueError as e:  # e.g. more images than sft.images_per_batch: the config's to fix
                raise ConfigError(str(e)) from None
            state, out = update(state, inputs)
            out = jax.device_get(out)  # waits for the update: the timing below is the step's
            seconds = time.perf_counter() - t0
            step += 1
            tokens = int(np.asarray(batch["attention_mask"]).sum())
            answer_tokens = float(out["aux"]["answer_tokens"])
            metrics = {"loss": float(out["loss"]), "answer_tokens": answer_tokens, "tokens": tokens,
                       "padded_tokens": int(np.asarray(batch["input_ids"]).size), "grad_norm": float(out["grad_norm"]),
                       "lr": lr, "seconds": seconds, "tokens_per_s": tokens / seconds,
                       "answer_tokens_per_s": answer_tokens / seconds, "skipped_nonfinite": int(out["skipped"]),
                       "data/seen": pipeline.stats.seen, "data/skipped": pipeline.stats.num_skipped,
                       "focus_only": int(focus_only)}  # the loss above covers focus tokens only
            if first:  # this run's first step: its compiles (or cache loads) included
                metrics["first_step_seconds"], first = seconds, False
            extra = {"record_ids": [str(i) for i in batch["id"]]} if config.logging.record_ids else None
            log.write(step, metrics, extra)
            kill_point("sft.metrics_written")  # the row is on disk, its checkpoint not yet
            if step % config.checkpoint.every_steps == 0 or step == total:
                meta = {"step": step, "updates": int(state.step), "skipped": int(state.skipped),
                        "data_seed": int(config.data.seed)}
                ckpt.save(step, params=state.params, opt_state=state.opt_state,
                          model_config=setup.config.to_hf_dict(), meta=meta, data_state=pipeline.get_state())
                kill_point("sft.checkpoint_saved")
        ckpt.wait()
        if config.export.hf_dir:
            from viper_jax.models.qwen2_5_vl import save_hf

            kill_point("sft.before_export")
            save_hf(state.params, setup.config, config.export.hf_dir,
                    tokenizer_dir=config.model.tokenizer_path or setup.path)
            log.message(f"exported the model to {config.export.hf_dir}")
    finally:
        pipeline.close()
        ckpt.close()
        log.close()
    return {"step": step, **metrics}


def run_cli(config_path: str, workdir: str | None, overrides: list[str]) -> None:
    """`viper sft --config FILE [--workdir DIR] [--config.a.b=value ...]`."""
    from viper_jax.sft.config import apply_overrides, load_config

    log_to_console()
    try:  # a user's mistake is one line naming the key or file, not a traceback
        config = load_config(config_path)
        apply_overrides(config, overrides)
        if workdir:
            config.workdir = workdir
        cache = compile_cache.enable(config.compile_cache_dir)  # before the first compile
        logging.getLogger(__name__).info("compilation cache: %s", cache or "off")
        result = train(config)
    except (ConfigError, ModelMismatchError, TooManySkippedError, CheckpointRestoreError) as e:
        if debugging():  # viper --debug: the traceback
            raise
        print(f"viper sft: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"finished at step {result['step']}; workdir {Path(config.workdir).absolute()}")
