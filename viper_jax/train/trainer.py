"""`viper train`: ViPER's phased GRPO (stage by stage, in `config.stage_order`), checkpointed and resumable.

One run goes through every stage; the global step counts across stages. A step: draw the stage's next
prompt batch, sample G responses per prompt, score them, update (grpo_step.py), log, and save every
`checkpoint.every_steps` steps and at every stage end. A restart with the same workdir resumes from the
latest checkpoint: parameters, optimizer state, step, stage, skip counters and the stage's data iterator
are restored, and step s always samples with fold_in(key(seed), s), so a killed and resumed run
reproduces an uninterrupted one exactly (on the same mesh and machine).

Several JAX processes (multi-host, the same command on every host): each process reads its own
records, a step's batch is the global array of every process's prompts (grpo_multihost.py), only
process 0 logs, and each checkpoint keeps every process's data position (a resume needs the same
process count).

train_meta (JSON, in each checkpoint): step, stage_index, stage_name, stage_step (steps done in that
stage), seed, rng (the key data of step `step`'s successor), skipped (non-finite updates).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from viper_common.atomic_files import write_text_atomic
from viper_common.kill_points import kill_point
from viper_jax import checkpoint, compile_cache, distributed, peer_loss
from viper_jax.distributed import ProcessBlocks, allgather_json
from viper_jax.dtypes import dtype_named
from viper_jax.rl.reward import get_reward
from viper_jax.rollout.engine import RolloutConfig, auto_shrink_rows
from viper_jax.rollout.sampling import SamplingConfig
from viper_jax.rollout.stop import StopStrings
from viper_jax.sharding import batch_shard_count
from viper_jax.train.config import ConfigError, updates_per_step, validate
from viper_jax.train.grpo_multihost import MultiProcess, check_split
from viper_jax.train.grpo_step import GRPOLearner, GRPOSettings, UpdateFns
from viper_jax.train.metrics import MetricsLogger
from viper_jax.train.model_source import load_params, setup_model
from viper_jax.train.optim import make_optimizer
from viper_jax.train.resume import ModelMismatchError, gather_data_state, init_or_restore
from viper_jax.train.stage_data import check_stage_data, make_stage_pipeline, stage_buckets, stage_check
from viper_jax.train.state import train_state_shardings

logger = logging.getLogger(__name__)

__all__ = ["train", "ModelMismatchError", "ConfigError"]


def _stage_ends(config: ConfigDict) -> list[int]:
    ends, total = [], 0
    for name in config.stage_order:
        total += int(config.stages[name].steps)
        ends.append(total)
    return ends


def write_config(workdir: Path, config: ConfigDict) -> None:
    """workdir/config.json (`viper train`, `viper sft`); a warning names the sections changed since the last run."""
    path = workdir / "config.json"
    new = json.loads(config.to_json_best_effort())
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:  # cut short by a kill (before it was written atomically): only the warning is lost
            logger.warning("%s does not parse; it is rewritten (sections changed since the last run unknown)", path)
            old = new
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            logger.warning("config differs from the previous run in this workdir in sections %s", changed)
    # Atomically: a kill mid-write would leave a config.json the next start cannot read.
    write_text_atomic(path, json.dumps(new, indent=2) + "\n")


def _batch_log(batch: dict[str, Any], pipeline: Any, processes: MultiProcess | None) -> tuple[list[str], int, int]:
    """(record ids of the global batch in its order, records seen, records skipped): with several
    processes, every process's, through one small allgather, so process 0 logs the whole step."""
    mine = {"ids": [str(i) for i in batch["id"]], "seen": pipeline.stats.seen, "skipped": pipeline.stats.num_skipped}
    every = [mine] if processes is None else processes.blocks.in_order(allgather_json(mine))
    return [i for e in every for i in e["ids"]], sum(e["seen"] for e in every), sum(e["skipped"] for e in every)


def train(config: ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) the configured stages; returns the last step's metrics plus `step`."""
    validate(config)
    check_stage_data(config)
    distributed.initialize_from_config(config.distributed)
    distributed.quiet_non_main_logging()
    main = distributed.is_main_process()
    workdir = Path(config.workdir).absolute()
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        write_config(workdir, config)

    # ---------------------------------------------------------------------------------------- model, state
    setup = setup_model(config, workdir)
    model_path, tokenizer, model_cfg, mesh, rules = setup.path, setup.tokenizer, setup.config, setup.mesh, setup.rules
    dtype, p_sh = setup.dtype, setup.param_shardings
    processes = None
    if jax.process_count() > 1:  # every process keeps its own prompts; refused here if the mesh cannot do that
        blocks = ProcessBlocks.of(mesh, rules)
        check_split(config.rl, blocks)
        processes = MultiProcess(blocks)

    stage_ends = _stage_ends(config)
    total_steps = stage_ends[-1]
    rl = config.rl
    optimizer, schedule = make_optimizer(config.optim, total_steps * updates_per_step(rl))
    shardings = train_state_shardings(optimizer, setup.abstract_params, p_sh)
    ckpt = checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                                        keep_steps=stage_ends, async_save=config.checkpoint.async_save)
    state, meta, data_state = init_or_restore(ckpt, setup, config, optimizer, shardings)
    latest = None if meta is None else int(meta["step"])  # the step restored (a later one may not restore)
    if meta is None:
        meta = {"step": 0, "stage_index": 0, "stage_name": config.stage_order[0], "stage_step": 0}
    elif meta["stage_index"] >= len(config.stage_order) or \
            config.stage_order[meta["stage_index"]] != meta["stage_name"]:
        raise ConfigError(f"checkpoint step {latest} is in stage {meta['stage_name']!r} (#{meta['stage_index']}), "
                          f"but config.stage_order is {list(config.stage_order)}")
    ref_params = None
    if rl.kl_coef > 0:  # the frozen reference is the starting policy: reloaded, never checkpointed
        ref_params = load_params(model_path, dtype, p_sh, config.model.scan_layers)

    auto_buckets = None
    if int(config.data.get("auto_buckets", 0)) > 0:  # same records on every process: the same buckets
        config = copy.deepcopy(config)  # the caller's config keeps its own buckets
        config.data.length_buckets = auto_buckets = stage_buckets(config, tokenizer)
    eos = tuple(int(tokenizer.convert_tokens_to_ids(t)) for t in config.rollout.eos_tokens)
    buckets = tuple(sorted(int(b) for b in config.data.length_buckets))
    rollout_cfg = RolloutConfig(
        max_new_tokens=int(config.rollout.max_new_tokens), prompt_buckets=buckets,
        max_cache_len=buckets[-1] + int(config.rollout.max_new_tokens), eos_token_ids=eos,
        pad_token_id=int(tokenizer.pad_token_id), group_size=int(rl.group_size),
        sampling=SamplingConfig(temperature=float(config.rollout.temperature), top_k=int(config.rollout.top_k),
                                top_p=float(config.rollout.top_p)),
        cache_dtype=dtype_named(config.rollout.cache_dtype) if config.rollout.cache_dtype else None)
    shrink = int(config.rollout.get("shrink_rows", -1))
    if shrink < 0:  # the decode batch is the whole step's rows, split over the mesh's batch axes
        rows = int(rl.prompts_per_step) * int(rl.group_size)
        shrink = auto_shrink_rows(rows, batch_shard_count(mesh, rules))
    rollout_cfg = dataclasses.replace(rollout_cfg, shrink_rows=shrink)
    settings = GRPOSettings.from_config(rl, config.rollout.temperature)
    decode = lambda tokens, lengths: tokenizer.batch_decode(
        [row[:n].tolist() for row, n in zip(tokens, lengths)], skip_special_tokens=True)
    stop_strings = tuple(config.rollout.get("stop_strings", ()))
    stop = StopStrings(stop_strings, lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) \
        if stop_strings else None
    learner = GRPOLearner(setup.graphdef, state, UpdateFns(setup.graphdef, optimizer, shardings, settings, mesh, rules),
                          settings, rollout_cfg, decode, schedule, model_cfg, ref_params, processes, stop)

    # ---------------------------------------------------------------------------------------- stages
    step = int(meta["step"])
    log = MetricsLogger(workdir, start_step=step, total_steps=total_steps, enabled=main,
                        tensorboard=config.logging.tensorboard, progress_bar=config.logging.progress_bar,
                        console_every=config.logging.every_steps)
    if auto_buckets is not None:
        log.message(f"prompt buckets from the data (data.auto_buckets): {list(auto_buckets)}")
    if latest is not None:
        log.message(f"resumed from {ckpt.directory}/{latest} (stage {meta['stage_name']}, step {step})")
    base_key = jax.random.key(int(config.seed))
    metrics: dict[str, Any] = {}
    first = True
    try:
        for index in range(int(meta["stage_index"]), len(config.stage_order)):
            name = config.stage_order[index]
            stage = config.stages[name]
            done = int(meta["stage_step"]) if index == meta["stage_index"] else 0
            if done >= stage.steps:
                continue
            pipeline = make_stage_pipeline(config, name, tokenizer, index)
            if done and data_state is not None:
                pipeline.set_state(data_state)
            reward_fn = get_reward(stage.reward, config.reward)
            try:
                for stage_step in range(done + 1, stage.steps + 1):
                    t0 = time.perf_counter()
                    batch = next(pipeline)
                    stage_check(name, stage.task, batch)
                    metrics = learner.step(batch, jax.random.fold_in(base_key, step), reward_fn)
                    if first:  # this run's first step, data and compiles (or cache loads) included
                        metrics["first_step_seconds"], first = time.perf_counter() - t0, False
                    step += 1
                    ids, seen, skipped = _batch_log(batch, pipeline, processes)
                    metrics.update({"stage_index": index, "data/seen": seen, "data/skipped": skipped})
                    extra = {"stage": name, "stage_step": stage_step}
                    if config.logging.record_ids:
                        extra["record_ids"] = ids
                    log.write(step, metrics, extra)
                    kill_point("train.metrics_written")  # the row is on disk, its checkpoint not yet
                    if step % config.checkpoint.every_steps == 0 or stage_step == stage.steps:
                        meta = {"step": step, "stage_index": index, "stage_name": name, "stage_step": stage_step,
                                "seed": int(config.seed), "updates": int(learner.state.step),
                                "skipped": int(learner.state.skipped),
                                "rng": np.asarray(jax.random.key_data(jax.random.fold_in(base_key, step))).tolist()}
                        ckpt.save(step, params=learner.state.params, opt_state=learner.state.opt_state,
                                  model_config=model_cfg.to_hf_dict(), meta=meta,
                                  data_state=gather_data_state(pipeline.get_state()))
                        kill_point("train.checkpoint_saved")
            finally:
                pipeline.close()
            if main:
                log.message(f"stage {name} finished at step {step}")
        ckpt.wait()
        if config.export.hf_dir:
            from viper_jax.models.qwen2_5_vl import save_hf

            kill_point("train.before_export")  # every step checkpointed, the export not written
            save_hf(learner.state.params, model_cfg, config.export.hf_dir,
                    tokenizer_dir=config.model.tokenizer_path or model_path)
            log.message(f"exported the policy to {config.export.hf_dir}")
    finally:
        ckpt.close()
        log.close()
    return {"step": step, **metrics}


def log_to_console() -> None:
    """INFO lines of viper_jax on the console (the CLIs of `viper train`, `viper sft`, `viper world base`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A library imported before this may already have given the root logger a handler (basicConfig is
    # then a no-op and the root stays at WARNING): our own INFO lines still go to that handler.
    logging.getLogger("viper_jax").setLevel(logging.INFO)


def run_cli(config_path: str, workdir: str | None, overrides: list[str]) -> None:
    """`viper train --config FILE [--workdir DIR] [--config.a.b=value ...]`."""
    from viper_jax.train.config import apply_overrides, load_config

    log_to_console()
    config = load_config(config_path)
    apply_overrides(config, overrides)
    if workdir:
        config.workdir = workdir
    if config.keep_freed_host_memory:  # before JAX starts its CPU client: see host_memory.py
        from viper_jax.host_memory import keep_freed_host_memory

        keep_freed_host_memory()
    cache = compile_cache.enable(config.compile_cache_dir)  # before the first compile
    logging.getLogger(__name__).info("compilation cache: %s", cache or "off")
    with peer_loss.stop_on_peer_loss("viper", config.distributed):
        result = train(config)
    if distributed.is_main_process():
        print(f"finished at step {result['step']}; workdir {Path(config.workdir).absolute()}")
