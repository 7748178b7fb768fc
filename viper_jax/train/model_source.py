"""Where a trainer's starting model comes from: model.path (an HF directory or an Orbax checkpoint), or a fresh
tiny random-init model written there first (model.tiny_init); its config.json, its tokenizer, architecture and
mesh placement (setup_model, shared by `viper train` and `viper sft`), and its parameters, placed."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from viper_jax.dtypes import dtype_named
from viper_jax.train.config import ConfigError


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
    dtype = dtype_named(config.model.dtype)
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(model_cfg, dtype=dtype, param_dtype=jnp.float32,
                                                 **model_options(config), rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    mesh = mesh_from_config(config.mesh)
    rules = rules_from_config(config.sharding_rules)
    return ModelSetup(path, tokenizer, model_cfg, dtype, graphdef, nnx.to_pure_dict(abstract_state), mesh, rules,
                      param_shardings(abstract, mesh, rules))


def resolve_model_path(config: ConfigDict, workdir: Path) -> Path:
    """model.path, after writing the tiny model there when model.tiny_init asks for it."""
    path = Path(config.model.path) if config.model.path else workdir / "tiny_model"
    if config.model.tiny_init:
        if jax.process_index() == 0 and not (path / "config.json").exists():
            from viper_jax.tiny import write_tiny_model

            # Written beside its place, then moved in with config.json last: a run killed between the weights and
            # the tokenizer left a config.json without tokenizer, which the next start took for a finished model.
            partial = path.with_name(path.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            write_tiny_model(partial, seed=int(config.model.tiny_seed))
            path.mkdir(parents=True, exist_ok=True)
            for f in sorted(partial.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(f, path / f.name)
            partial.rmdir()
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
