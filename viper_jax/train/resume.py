"""Starting or resuming a trainer (`viper train`, `viper sft`) in its workdir: the checks that refuse a checkpoint
of another model or layer layout, the train state restored onto the current mesh (or initialised from model.path),
and the data iterators' positions (one per process)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ml_collections import ConfigDict

from viper_jax.train.config import ConfigError
from viper_jax.train.model_source import ModelSetup, load_params
from viper_jax.train.state import TrainState, init_train_state


logger = logging.getLogger(__name__)


class ModelMismatchError(ValueError):
    """The workdir's checkpoint belongs to a different model than the configured one."""


class CheckpointRestoreError(RuntimeError):
    """The workdir has checkpoint steps and none of them restores."""


def _short(error: BaseException, limit: int = 600) -> str:
    from viper_jax.checkpoint import short_error  # one definition, shared with the readers of viper convert

    return short_error(error, limit)


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        out = []
        for f in dataclasses.fields(a):
            out += _differences(getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: checkpoint {a!r}, configured model {b!r}"]


def check_same_model(ckpt_config: dict[str, Any], model_config: Any, directory: Path, step: int,
                     model_path: Path) -> None:
    """Refuses to resume parameters of another architecture (or another tokenizer's special ids)."""
    from viper_jax.models.qwen2_5_vl import Qwen2_5_VLConfig

    diffs = _differences(Qwen2_5_VLConfig.from_hf_dict(ckpt_config), model_config)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ModelMismatchError(f"checkpoint {directory}/{step} was written for a different model than "
                                 f"model.path={model_path}: {shown}. Use a new workdir or the matching model.")


def check_layer_layout(directory: Path, step: int, scan_layers: bool) -> None:
    """Refuses to resume a checkpoint whose layers are in the other layout than model.scan_layers."""
    from viper_jax.convert import saved_layers_stacked

    if saved_layers_stacked(directory, step) != scan_layers:
        held = "per layer (model.scan_layers=False)" if scan_layers else "stacked (model.scan_layers=True)"
        raise ConfigError(f"checkpoint {directory}/{step} holds its layers {held}, but the config sets "
                          f"model.scan_layers={scan_layers}: resume with the setting it was trained with "
                          f"(load_orbax converts a checkpoint between the layouts for other uses)")


def restore_train_state(ckpt: Any, step: int, optimizer: Any, abstract_params: Any, shardings: Any
                        ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(TrainState, train_meta, data_state) of checkpoint `step`, every array placed with `shardings`
    (a TrainState of NamedShardings on the current mesh, whichever mesh wrote the checkpoint)."""
    from viper_jax import checkpoint

    def target(tree: Any, sh: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

    master = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), abstract_params)
    abstract_opt = jax.eval_shape(optimizer.init, master)
    items = ckpt.restore(step, target(master, shardings.params), target(abstract_opt, shardings.opt_state))
    meta = items[checkpoint.TRAIN_META]
    state = TrainState(step=jax.device_put(jnp.int32(meta["updates"]), shardings.step),
                       params=items[checkpoint.PARAMS], opt_state=items[checkpoint.OPT_STATE],
                       skipped=jax.device_put(jnp.int32(meta["skipped"]), shardings.skipped))
    return state, meta, items[checkpoint.DATA_STATE]


def gather_data_state(state: dict[str, Any]) -> dict[str, Any]:
    """The data iterator state to checkpoint. One process: its state, as always. Several: every
    process reads its own records, so every process's state is saved, indexed by process (Orbax writes
    JSON items from process 0 only, so each state must reach it: a small host allgather)."""
    if jax.process_count() == 1:
        return state
    from viper_jax.distributed import allgather_json

    return {"process_count": jax.process_count(), "processes": allgather_json(state)}


def own_data_state(saved: dict[str, Any] | None) -> dict[str, Any] | None:
    """This process's data iterator state from a checkpoint's `data_state` (see gather_data_state)."""
    if saved is None:
        return None
    n = jax.process_count()
    written = len(saved["processes"]) if "processes" in saved else 1
    if written != n:
        # Process i reads records i, i+n, ... of the shards: positions do not carry over to another n.
        raise ConfigError(f"the checkpoint's data positions were written by {written} process(es) and this run has "
                          f"{n}: resume with {written}, or train on in a new workdir from the exported policy")
    return saved["processes"][jax.process_index()] if "processes" in saved else saved


def _restore_step(ckpt: Any, step: int, setup: ModelSetup, config: ConfigDict, optimizer: Any, shardings: Any
                  ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    check_same_model(ckpt.restore_json(step), setup.config, ckpt.directory, step, setup.path)
    check_layer_layout(ckpt.directory, step, config.model.scan_layers)
    return restore_train_state(ckpt, step, optimizer, setup.abstract_params, shardings)


def init_or_restore(ckpt: Any, setup: ModelSetup, config: ConfigDict, optimizer: Any, shardings: Any
                    ) -> tuple[TrainState, dict[str, Any] | None, dict[str, Any] | None]:
    """(TrainState, train_meta, this process's data state): from model.path when the workdir has no
    checkpoint yet (meta and data state None), else from its latest checkpoint that restores, after refusing
    one of another model or layer layout (those errors stop the run: they are the config's, not the disk's).

    A step that fails to restore (a truncated or missing file: what a crash or a full disk leaves) is named in
    a warning with its error and the step before it is tried; once one restores, the failed later steps are
    moved to `<checkpoints>.corrupt/` so the run can write those steps again. Steps exist but none restores:
    CheckpointRestoreError (nothing is moved; the run does not silently start over)."""
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps:
        params = load_params(setup.path, setup.dtype, setup.param_shardings, config.model.scan_layers)
        return init_train_state(params, optimizer, shardings), None, None
    failed: list[tuple[int, BaseException]] = []
    for step in steps:
        try:
            state, meta, data_state = _restore_step(ckpt, step, setup, config, optimizer, shardings)
        except (ModelMismatchError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - any read error of this step's files: try the one before
            logger.warning("checkpoint %s/%d does not restore (%s); trying the step before it",
                           ckpt.directory, step, _short(e))
            failed.append((step, e))
            continue
        for bad, _ in failed:
            aside = ckpt.set_aside(bad)
            logger.warning("resuming from step %d: checkpoint step %d, which does not restore, moved to %s",
                           step, bad, aside)
        return state, meta, own_data_state(data_state)
    shown = "; ".join(f"step {s}: {_short(e, 300)}" for s, e in failed)
    raise CheckpointRestoreError(f"no checkpoint in {ckpt.directory} restores ({shown}). Move the folder away "
                                 f"to start over, or restore the files.")
