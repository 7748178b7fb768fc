"""The trainer's inputs: the starting model (HF or Orbax, or a fresh tiny one), the per-stage data
pipelines, and the checks that refuse a run before it wastes time (wrong model, stage without data,
records of the wrong task)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from viper_common import records
from viper_jax.train.config import ConfigError


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ModelMismatchError(ValueError):
    """The workdir's checkpoint belongs to a different model than the configured one."""


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """What a trainer (`viper train`, `viper sft`) knows of its model before any state exists."""

    path: Path              # model.path resolved (HF directory or Orbax checkpoint)
    tokenizer: Any
    config: Any             # Qwen2_5_VLConfig
    dtype: Any              # compute dtype
    graphdef: Any
    abstract_params: Any    # pure dict of ShapeDtypeStructs
    mesh: Any
    rules: Any
    param_shardings: Any    # pure dict of NamedShardings


def setup_model(config: ConfigDict, workdir: Path) -> ModelSetup:
    """Tokenizer, architecture, mesh and parameter shardings from config.model / mesh / sharding_rules."""
    from transformers import AutoTokenizer

    from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
    from viper_jax.sharding import mesh_from_config, param_shardings, rules_from_config
    from viper_jax.train.config import model_options

    path = resolve_model_path(config, workdir)
    tokenizer = AutoTokenizer.from_pretrained(str(config.model.tokenizer_path or path))
    model_cfg = Qwen2_5_VLConfig.from_hf_dict(read_model_config(path))
    dtype = DTYPES[config.model.dtype]
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(model_cfg, dtype=dtype, param_dtype=jnp.float32,
                                                 **model_options(config), rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    mesh = mesh_from_config(config.mesh)
    rules = rules_from_config(config.sharding_rules)
    return ModelSetup(path, tokenizer, model_cfg, dtype, graphdef, nnx.to_pure_dict(abstract_state), mesh, rules,
                      param_shardings(abstract, mesh, rules))


def init_or_restore(ckpt: Any, setup: ModelSetup, config: ConfigDict, optimizer: Any, shardings: Any
                    ) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    """(TrainState, train_meta, this process's data state): from model.path when the workdir has no
    checkpoint yet (meta and data state None), else from its latest checkpoint, after refusing one of
    another model or layer layout."""
    from viper_jax.train_state import init_train_state

    latest = ckpt.latest_step()
    if latest is None:
        params = load_params(setup.path, setup.dtype, setup.param_shardings, config.model.scan_layers)
        return init_train_state(params, optimizer, shardings), None, None
    check_same_model(ckpt.restore_json(latest), setup.config, ckpt.directory, latest, setup.path)
    check_layer_layout(ckpt.directory, latest, config.model.scan_layers)
    state, meta, data_state = restore_train_state(ckpt, latest, optimizer, setup.abstract_params, shardings)
    return state, meta, own_data_state(data_state)


def resolve_model_path(config: ConfigDict, workdir: Path) -> Path:
    """model.path, after writing the tiny model there when model.tiny_init asks for it."""
    path = Path(config.model.path) if config.model.path else workdir / "tiny_model"
    if config.model.tiny_init:
        if jax.process_index() == 0 and not (path / "config.json").exists():
            from viper_jax.tiny import write_tiny_model

            write_tiny_model(path, seed=int(config.model.tiny_seed))
        if jax.process_count() > 1:  # the other processes read it only once process 0 has written it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("viper tiny model written")
    if not path.exists():
        raise ConfigError(f"config model.path: {path} does not exist")
    return path


def read_model_config(path: Path) -> dict[str, Any]:
    """The config.json dict of an HF directory or of an Orbax checkpoint's latest step."""
    if (path / "config.json").exists():
        return json.loads((path / "config.json").read_text())
    from viper_jax import checkpoint

    try:
        return checkpoint.restore_model_config(path)[0]
    except FileNotFoundError:
        raise ConfigError(f"config model.path: {path} is neither an HF directory (config.json) nor an Orbax "
                          f"checkpoint directory") from None


def load_params(path: Path, dtype: Any, shardings: Any, scan_layers: bool = True) -> Any:
    """The starting parameters as a pure dict placed with `shardings`, in the layer layout of
    `scan_layers` (fp32 from HF; as saved from Orbax, cast to fp32 by init_train_state)."""
    if (path / "config.json").exists():
        from viper_jax.models.qwen2_5_vl import load_hf

        model = load_hf(path, dtype=dtype, param_dtype=jnp.float32, shardings=shardings, scan_layers=scan_layers)
    else:
        from viper_jax.convert import load_orbax

        model = load_orbax(path, dtype=dtype, shardings=shardings, scan_layers=scan_layers)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


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


def stage_data_config(config: ConfigDict, name: str, index: int) -> ConfigDict:
    data = ConfigDict(config.data.to_dict())
    data.shard_globs = tuple(config.stages[name].data_globs)
    # rl.prompts_per_step is the global batch: each process reads its share of it (its own records).
    data.batch_size = int(config.rl.prompts_per_step) // jax.process_count()
    data.seed = int(config.data.seed) + index  # each stage its own permutation
    return data


def check_stage_data(config: ConfigDict) -> None:
    """Every stage's globs must match files before anything slow starts (loading, compiling)."""
    from viper_jax.data.pipeline import resolve_shards

    import grain

    for name in config.stage_order:
        try:
            paths = resolve_shards(tuple(config.stages[name].data_globs))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"stage {name!r} has no data: {e} (config stages.{name}.data_globs)") from None
        source = grain.sources.ArrayRecordDataSource(paths)
        if len(source) == 0:
            raise ConfigError(f"stage {name!r} has no data: its {len(paths)} shard(s) hold no records "
                              f"(config stages.{name}.data_globs)")
        try:  # the first record's task: a stage pointed at the other stage's data fails now, not after loading
            first = records.decode(bytes(source[0]))
        except records.RecordError:
            continue  # a bad record is the pipeline's to count and skip
        stage_check(name, config.stages[name].task, {"id": [first.id], "task": [first.task]})


def make_stage_pipeline(config: ConfigDict, name: str, tokenizer: Any, index: int) -> Any:
    """The stage's DataPipeline; a glob matching nothing or shards without records name the stage."""
    return data_pipeline(stage_data_config(config, name, index), tokenizer,
                         f"stage {name!r} has no data (config stages.{name}.data_globs)")


def data_pipeline(data_config: ConfigDict, tokenizer: Any, where: str, **kwargs: Any) -> Any:
    """make_pipeline(data_config, tokenizer, **kwargs); a glob matching nothing or shards without
    records are a ConfigError that starts with `where` (which config key to fix)."""
    from viper_jax.data import make_pipeline

    try:
        return make_pipeline(data_config, tokenizer, **kwargs)
    except FileNotFoundError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        if "no records" in str(e):
            raise ConfigError(f"{where}: {e}") from None
        raise


def stage_check(name: str, task: str, batch: dict[str, Any]) -> None:
    """A stage trains on its own task only (the paper: stages run in sequence, never mixed)."""
    for rid, t in zip(batch["id"], batch["task"]):
        if t != task:
            raise ConfigError(f"stage {name!r} (task {task!r}) read record {rid!r} of task {t!r}: "
                              f"its data_globs must hold {task} records only")


def restore_train_state(ckpt: Any, step: int, optimizer: Any, abstract_params: Any, shardings: Any
                        ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(TrainState, train_meta, data_state) of checkpoint `step`, every array placed with `shardings`
    (a TrainState of NamedShardings on the current mesh, whichever mesh wrote the checkpoint)."""
    from viper_jax import checkpoint
    from viper_jax.train_state import TrainState

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
    from viper_jax.multihost import allgather_json

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
