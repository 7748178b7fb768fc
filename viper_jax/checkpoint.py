"""Orbax checkpoints: the one on-disk layout for JAX-side weights.

A checkpoint directory is an Orbax `CheckpointManager` directory with one sub-directory per step.
Every step holds at least two items:
  params        the model's parameter pytree (nested dicts of arrays, `nnx.State.to_pure_dict()`)
  model_config  the HF-style config.json dict the parameters belong to
The GRPO trainer adds its own items (optimizer state, trainer metadata, data iterator state) to the
same steps, so `viper convert orbax-to-hf` reads a trainer checkpoint and a converted one alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

PARAMS = "params"
MODEL_CONFIG = "model_config"


def _manager(directory: str | Path, *, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def latest_step(directory: str | Path) -> int | None:
    if not Path(directory).is_dir():
        return None
    with _manager(directory, read_only=True) as mngr:
        return mngr.latest_step()


def save_params(directory: str | Path, params: Any, model_config: dict[str, Any], step: int = 0) -> Path:
    """Writes `params` and `model_config` as step `step` (blocking; conversions are one-off jobs)."""
    with _manager(directory) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params),
            MODEL_CONFIG: ocp.args.JsonSave(model_config),
        }))
        mngr.wait_until_finished()
    return Path(directory) / str(step)


def restore_model_config(directory: str | Path, step: int | None = None) -> tuple[dict[str, Any], int]:
    """The config.json dict stored with a checkpoint, and the step it came from (default: latest)."""
    with _manager(directory, read_only=True) as mngr:
        step = _resolve_step(mngr, directory, step)
        restored = mngr.restore(step, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))
        return restored[MODEL_CONFIG], step


def restore_params(directory: str | Path, target: Any = None, step: int | None = None) -> Any:
    """Restores the params item. `target`: a pytree of arrays or `jax.ShapeDtypeStruct`s whose shardings
    decide where each restored array lives (so a checkpoint restores onto any mesh); None restores the
    arrays as saved (dtypes included) onto the default device."""
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with _manager(directory, read_only=True) as mngr:
        step = _resolve_step(mngr, directory, step)
        restored = mngr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract)}))
        return restored[PARAMS]


def _resolve_step(mngr: ocp.CheckpointManager, directory: str | Path, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"no Orbax checkpoint steps in {directory}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"step {step} not in {directory}; available: {sorted(steps)}")
    return step
