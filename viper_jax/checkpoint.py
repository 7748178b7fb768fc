"""Orbax checkpoints: the one on-disk layout for JAX-side weights.

A checkpoint directory is an Orbax `CheckpointManager` directory with one sub-directory per step.
Every step holds at least two items:
  params        the model's parameter pytree (nested dicts of arrays, `nnx.State.to_pure_dict()`)
  model_config  the HF-style config.json dict the parameters belong to
The GRPO trainer adds its own items (optimizer state, trainer metadata, data iterator state) to the
same steps, so `viper convert orbax-to-hf` reads a trainer checkpoint and a converted one alike:
  opt_state     the optax state (same shardings as the parameters it mirrors)
  train_meta    JSON: step, stage, stage step, RNG, skip counters (see viper_jax/train/trainer.py)
  data_state    JSON: the stage's data iterator state (DataPipeline.get_state())
`TrainCheckpointer` writes them asynchronously and keeps the latest K steps plus named steps (stage ends).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import orbax.checkpoint as ocp

from viper_common import kill_points

PARAMS = "params"
MODEL_CONFIG = "model_config"
OPT_STATE = "opt_state"
TRAIN_META = "train_meta"
DATA_STATE = "data_state"


class CheckpointReadError(ValueError):
    """A checkpoint step whose files do not restore (cut short, deleted, overwritten); names the step."""


class CheckpointWriteError(OSError):
    """A checkpoint step that could not be written (a full disk): it was never committed (Orbax writes a step
    under a temporary name), so a rerun resumes from the step before it. An OSError: the CLIs print it as one
    line, as every other unwritable file."""


def short_error(error: BaseException, limit: int = 600) -> str:
    """The innermost cause of a restore error, on one line: Orbax wraps TensorStore's own message (which
    names the item's folder, the array and what is wrong with its file) in a page of TensorStore spec."""
    seen = [error]
    while (nxt := seen[-1].__cause__ or seen[-1].__context__) is not None and nxt not in seen:
        seen.append(nxt)
    text = " ".join(f"{type(seen[-1]).__name__}: {seen[-1]}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _restore(mngr: ocp.CheckpointManager, directory: str | Path, step: int, args: Any) -> Any:
    """mngr.restore, a damaged step reported by name: Orbax raises bare Exceptions and KeyErrors for it."""
    try:
        return mngr.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - every read failure of this step's files is the same for a user
        others = sorted(s for s in mngr.all_steps() if s != step)
        hint = f"; other steps: {others} (choose one with --step)" if others else ""
        raise CheckpointReadError(f"checkpoint step {Path(directory) / str(step)} does not restore "
                                  f"({short_error(e, 400)}){hint}") from e


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
        restored = _restore(mngr, directory, step, ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))
        return restored[MODEL_CONFIG], step


def restore_params(directory: str | Path, target: Any = None, step: int | None = None) -> Any:
    """Restores the params item. `target`: a pytree of arrays or `jax.ShapeDtypeStruct`s whose shardings
    decide where each restored array lives (so a checkpoint restores onto any mesh); None restores the
    arrays as saved (dtypes included) onto the default device."""
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with _manager(directory, read_only=True) as mngr:
        step = _resolve_step(mngr, directory, step)
        restored = _restore(mngr, directory, step, ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract)}))
        return restored[PARAMS]


def saved_params_tree(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """The params item's tree as saved (nested dicts with string keys, array metadata leaves), read
    without loading any array. step: default the latest."""
    if step is None:
        with _manager(directory, read_only=True) as mngr:
            step = _resolve_step(mngr, directory, step)
    return ocp.StandardCheckpointHandler().metadata(Path(directory).absolute() / str(step) / PARAMS).tree


def _resolve_step(mngr: ocp.CheckpointManager, directory: str | Path, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"no Orbax checkpoint steps in {directory}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"step {step} not in {directory}; available: {sorted(steps)}")
    return step


def _abstract(target: Any) -> Any:
    """ShapeDtypeStructs carrying the target's shardings: Orbax restores each array straight into them."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, target)


class TrainCheckpointer:
    """The trainer's checkpoints: params + model_config (the layout every JAX-side tool reads) plus
    opt_state, train_meta and data_state in the same step directories.

    Saves are asynchronous (Orbax copies the arrays to host memory before `save` returns, so the next
    donated update cannot change what is written) and atomic: a step directory appears only when complete,
    so a run killed mid-save resumes from the previous step. Kept: the latest `keep` steps and every step
    in `keep_steps` (stage ends). Restoring into abstract targets with shardings places every array on the
    current mesh, whatever mesh wrote it.
    """

    def __init__(self, directory: str | Path, *, keep: int, keep_steps: Sequence[int] = (), async_save: bool = True):
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(int(keep)),
            ocp.checkpoint_managers.CustomSteps([int(s) for s in keep_steps])])
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save,
                                               preservation_policy=policy, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step an asynchronous save may still be writing

    @contextlib.contextmanager
    def _writing(self, step: int | None) -> Iterator[None]:
        """A failed write of `step` (raised by its own save, or by the wait for an asynchronous one) as one
        CheckpointWriteError naming the step, the folder and the file Orbax could not write."""
        try:
            yield
        except (OSError, ValueError) as raised:  # ValueError: TensorStore's write errors (a full disk among them)
            # Orbax's clean-up of the step's temporary folder can fail in turn (other writer threads still
            # at work) and that error is the one raised: report the full disk (or other cause) behind it.
            chain: list[BaseException] = [raised]
            while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
                chain.append(nxt)
            full = next((c for c in chain if getattr(c, "errno", None) == errno.ENOSPC), None)
            if full is None:
                full = next((c for c in chain if "No space left on device" in str(c)), None)
            if isinstance(full, OSError):
                cause = f"{full.strerror}" + (f" ({full.filename})" if full.filename else "")
            elif full is not None:
                cause = short_error(full, 300)
            else:  # the asynchronous writers' own error is lost: the free space tells a full disk apart
                free = shutil.disk_usage(self.directory).free / 2**20
                cause = f"{short_error(raised, 300)}; {free:.0f} MiB free there"
            committed = [s for s in self.manager.all_steps() if s != step]
            resume = f"a rerun resumes from step {max(committed)}" if committed else "a rerun starts over"
            code = errno.ENOSPC if full is not None else getattr(raised, "errno", None)
            message = f"checkpoint step {step} in {self.directory} could not be written: {cause}; it was not " \
                      f"committed, {resume}"
            raise (CheckpointWriteError(message) if code is None else CheckpointWriteError(code, message)) from raised

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, *, params: Any, opt_state: Any, model_config: dict[str, Any], meta: dict[str, Any],
             data_state: dict[str, Any]) -> None:
        kill_points.kill_point("checkpoint.before_save")
        self.wait()  # Orbax would wait for the previous save here anyway; its failure is named as its own
        self._pending = step
        with self._writing(step):
            self.manager.save(step, force=True, args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardSave(params),
                MODEL_CONFIG: ocp.args.JsonSave(model_config),
                OPT_STATE: ocp.args.StandardSave(opt_state),
                TRAIN_META: ocp.args.JsonSave(meta),
                DATA_STATE: ocp.args.JsonSave(data_state),
            }))
        # Asynchronous saves are still writing here: a kill now lands inside the save (its step must not appear).
        kill_points.kill_point("checkpoint.save_started")
        if kill_points.armed("checkpoint.committed"):  # only a kill point waits: the save stays asynchronous
            self.manager.wait_until_finished()
        kill_points.kill_point("checkpoint.committed")

    def restore_json(self, step: int, item: str = MODEL_CONFIG) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def restore(self, step: int, params_target: Any, opt_state_target: Any) -> dict[str, Any]:
        """All five items of `step`; params/opt_state land in the targets' shapes, dtypes and shardings."""
        items = {PARAMS: ocp.args.StandardRestore(_abstract(params_target)),
                 OPT_STATE: ocp.args.StandardRestore(_abstract(opt_state_target)),
                 MODEL_CONFIG: ocp.args.JsonRestore(), TRAIN_META: ocp.args.JsonRestore(),
                 DATA_STATE: ocp.args.JsonRestore()}
        return dict(self.manager.restore(step, args=ocp.args.Composite(**items)).items())

    def set_aside(self, step: int) -> Path:
        """Moves step `step` (one that does not restore) out of the manager's directory, to
        `<directory>.corrupt/<step>` (kept for inspection, never deleted), so that the run can write that
        step again. Only process 0 moves it; every process then re-reads the step list."""
        aside = self.directory.with_name(self.directory.name + ".corrupt") / str(step)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            n = 1
            while aside.exists():  # the same step set aside by an earlier restart
                aside, n = aside.with_name(f"{step}.{n}"), n + 1
            shutil.move(str(self.directory / str(step)), str(aside))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"viper_jax.checkpoint.set_aside.{step}")
        self.manager.reload()
        return aside

    def wait(self) -> None:
        with self._writing(self._pending):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
