"""Weights between HF directories and Orbax checkpoints, and loading a model from either.

`viper convert hf-to-orbax` / `orbax-to-hf` call these. Both directions are lossless: tensors keep their
dtype (fp32 or bf16) bit for bit, so a trained policy exported to HF is exactly what was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from viper_jax import checkpoint
from viper_jax.dtypes import dtype_named
from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, load_hf, relayout_params, save_hf
from viper_jax.models.qwen2_5_vl.weights import holds_per_layer



def is_orbax_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and not (path / "config.json").exists() and checkpoint.latest_step(path) is not None


def hf_to_orbax(hf_dir: str | Path, out: str | Path, dtype: str = "float32", step: int = 0) -> Path:
    model = load_hf(hf_dir, dtype=dtype_named(dtype), param_dtype=dtype_named(dtype))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return checkpoint.save_params(out, params, model.config.to_hf_dict(), step=step)


def load_orbax(ckpt: str | Path, step: int | None = None, dtype: Any = jnp.float32, shardings: Any = None,
               remat: str = "none", scan_layers: bool = True) -> Qwen2_5_VL:
    """Qwen2_5_VL from an Orbax checkpoint (converted or trained), parameters in their saved dtype.

    shardings: a pure-dict pytree of Shardings matching the parameters (restores straight onto a mesh).
    A checkpoint in the other layer layout (stacked vs `scan_layers=False`) is restored as saved and
    then restacked or split, a one-off copy of the weights.
    """
    cfg_dict, step = checkpoint.restore_model_config(ckpt, step)
    cfg = Qwen2_5_VLConfig.from_hf_dict(cfg_dict)
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(cfg, dtype=dtype, remat=remat, scan_layers=scan_layers,
                                                 rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    saved_stacked = saved_layers_stacked(ckpt, step)
    target = None
    if shardings is not None and saved_stacked == scan_layers:
        shapes = nnx.to_pure_dict(state)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    params = relayout_params(checkpoint.restore_params(ckpt, target, step), stacked=scan_layers)
    if shardings is not None and target is None:
        params = jax.device_put(params, shardings)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def saved_layers_stacked(ckpt: str | Path, step: int | None = None) -> bool:
    """Whether an Orbax checkpoint holds its layers stacked (scan_layers=True) or one subtree per layer."""
    return not holds_per_layer(checkpoint.saved_params_tree(ckpt, step)["language_model"]["layers"])


def load_model(path: str | Path, dtype: Any = jnp.float32, step: int | None = None) -> Qwen2_5_VL:
    """An HF directory or an Orbax checkpoint directory, whichever `path` is."""
    path = Path(path)
    if (path / "config.json").exists():
        return load_hf(path, dtype=dtype)
    if is_orbax_dir(path):
        return load_orbax(path, step, dtype=dtype)
    raise FileNotFoundError(f"{path} is neither an HF model directory (config.json + safetensors) "
                            f"nor an Orbax checkpoint directory")


def orbax_to_hf(ckpt: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None,
                step: int | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    model = load_orbax(ckpt, step)
    return save_hf(model, None, out, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes)
