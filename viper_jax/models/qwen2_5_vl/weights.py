"""HF safetensors <-> Qwen2_5_VL parameters.

Reading uses a small memory-mapped safetensors reader instead of `safe_open`: `framework="numpy"`
cannot return bfloat16 (numpy has no bf16), and `framework="flax"` puts every tensor on the default
accelerator. A NumPy memmap view (with `ml_dtypes.bfloat16`) can be reshaped/transposed into our
layout for free and sliced so that only the bytes a device needs are read, which keeps host memory
near one tensor when loading onto a mesh. Files are written in the same format (8-byte header length,
JSON header, raw little-endian data) with `{"format": "pt"}` metadata, as transformers writes them.

Layout conversions (ours <- HF): Linear weight [out, in] -> kernel [in, out]; fused vision qkv
[3D, D] -> [D, 3, D] and its bias [3D] -> [3, D]; Conv3d patch weight [D, C, T, P, P] -> [C*T*P*P, D];
per-layer tensors are stacked on a leading layer axis, or (`scan_layers=False`) kept per layer under
`layers.<i>` / `blocks.<i>`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from viper_common.atomic_files import (remove_stale_temporaries, write_bytes_atomic, write_failed,
                                       write_text_atomic)
from viper_common.kill_points import kill_point

from .config import Qwen2_5_VLConfig
from .model import Qwen2_5_VL

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer*.json", "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template*", "preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json", "generation_config.json")


# ---------------------------------------------------------------------------- layout conversions

@dataclasses.dataclass(frozen=True)
class _Kind:
    to_ours: Callable[[np.ndarray], np.ndarray]  # views only, so slicing a memmap reads only what is needed
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # from our (per-layer) shape


COPY = _Kind(lambda a: a, lambda a: a, lambda s: s)
LINEAR = _Kind(lambda a: a.T, lambda a: a.T, lambda s: s[::-1])
QKV_W = _Kind(lambda a: a.reshape(3, a.shape[0] // 3, a.shape[1]).transpose(2, 0, 1),
              lambda a: a.transpose(1, 2, 0).reshape(-1, a.shape[0]), lambda s: (s[1] * s[2], s[0]))
QKV_B = _Kind(lambda a: a.reshape(3, -1), lambda a: a.reshape(-1), lambda s: (s[0] * s[1],))


def _patch_kind(cfg: Qwen2_5_VLConfig) -> _Kind:
    v = cfg.vision
    conv = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return _Kind(lambda a: a.reshape(a.shape[0], -1).T, lambda a: a.T.reshape(conv), lambda s: conv)


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple[str, ...]  # our parameter path in nnx.to_pure_dict(nnx.state(model))
    hf: str                # hub tensor name, "{i}" marks the layer index
    layers: int | None     # stacked layer count, None for a single tensor
    kind: _Kind

    def hf_names(self) -> list[str]:
        return [self.hf] if self.layers is None else [self.hf.format(i=i) for i in range(self.layers)]


def _entries(cfg: Qwen2_5_VLConfig) -> list[_Entry]:
    v, t = cfg.vision, cfg.text
    out = [_Entry(("visual", "patch_embed", "kernel"), "visual.patch_embed.proj.weight", None, _patch_kind(cfg))]
    block = [("norm1.weight", "norm1.scale", COPY), ("norm2.weight", "norm2.scale", COPY),
             ("attn.qkv.weight", "attn.qkv.kernel", QKV_W), ("attn.qkv.bias", "attn.qkv.bias", QKV_B),
             ("attn.proj.weight", "attn.proj.kernel", LINEAR), ("attn.proj.bias", "attn.proj.bias", COPY)]
    for p in ("gate_proj", "up_proj", "down_proj"):
        block += [(f"mlp.{p}.weight", f"mlp.{p}.kernel", LINEAR), (f"mlp.{p}.bias", f"mlp.{p}.bias", COPY)]
    out += [_Entry(("visual", "blocks", *ours.split(".")), f"visual.blocks.{{i}}.{hf}", v.depth, k) for hf, ours, k in block]
    out += [_Entry(("visual", "merger", "ln_q", "scale"), "visual.merger.ln_q.weight", None, COPY)]
    for i in (0, 2):
        out += [_Entry(("visual", "merger", f"mlp_{i}", "kernel"), f"visual.merger.mlp.{i}.weight", None, LINEAR),
                _Entry(("visual", "merger", f"mlp_{i}", "bias"), f"visual.merger.mlp.{i}.bias", None, COPY)]
    out.append(_Entry(("language_model", "embed_tokens", "embedding"), "model.embed_tokens.weight", None, COPY))
    layer = [("input_layernorm.weight", "input_layernorm.scale", COPY),
             ("post_attention_layernorm.weight", "post_attention_layernorm.scale", COPY),
             ("self_attn.o_proj.weight", "self_attn.o_proj.kernel", LINEAR)]
    for p in ("q_proj", "k_proj", "v_proj"):
        layer += [(f"self_attn.{p}.weight", f"self_attn.{p}.kernel", LINEAR), (f"self_attn.{p}.bias", f"self_attn.{p}.bias", COPY)]
    layer += [(f"mlp.{p}.weight", f"mlp.{p}.kernel", LINEAR) for p in ("gate_proj", "up_proj", "down_proj")]
    out += [_Entry(("language_model", "layers", *ours.split(".")), f"model.layers.{{i}}.{hf}", t.num_hidden_layers, k)
            for hf, ours, k in layer]
    out.append(_Entry(("language_model", "norm", "scale"), "model.norm.weight", None, COPY))
    if not cfg.tie_word_embeddings:
        out.append(_Entry(("lm_head", "weight"), "lm_head.weight", None, COPY))
    return out


LAYER_STACKS = (("language_model", "layers"), ("visual", "blocks"))


def holds_per_layer(layers: Any) -> bool:
    """Whether a layer container of a parameter tree (`language_model.layers`, `visual.blocks`) holds one
    subtree per layer (`scan_layers=False`; keys 0..L-1, strings once flattened or restored by Orbax)
    rather than stacked arrays."""
    return hasattr(layers, "keys") and any(str(k) == "0" for k in layers)


def relayout_params(params: dict, stacked: bool) -> dict:
    """Parameters (a pure dict) in the layer layout of a model built with `scan_layers=stacked`: each
    layer's tensors stacked on a leading axis, or one subtree per layer under integer keys."""
    out = dict(params)
    for top, name in LAYER_STACKS:
        out[top] = dict(out[top])
        layers = out[top][name]
        if holds_per_layer(layers):
            ordered = [layers[k] for k in sorted(layers, key=int)]
            out[top][name] = (jax.tree.map(lambda *a: jnp.stack(a), *ordered) if stacked
                              else dict(enumerate(ordered)))
        elif not stacked:
            n = jax.tree.leaves(layers)[0].shape[0]
            out[top][name] = {i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)}
    return out


def _as_held(entries: list[_Entry], tree: dict, key: Callable[[int], Any] = int) -> list[_Entry]:
    """The entries as the parameter `tree` holds them: a stacked entry stays one; one whose layers the tree
    holds per layer becomes one single-tensor entry per layer, at path (..., "layers", key(i), ...)."""
    out = []
    for e in entries:
        if e.layers is None or not holds_per_layer(tree.get(e.path[0], {}).get(e.path[1])):
            out.append(e)
        else:
            out += [_Entry((*e.path[:2], key(i), *e.path[2:]), e.hf.format(i=i), None, e.kind) for i in range(e.layers)]
    return out


def hub_name(name: str) -> str:
    """transformers >= 4.52 in-memory names (model.visual.*, model.language_model.*) -> hub names."""
    name = re.sub(r"^model\.visual\.", "visual.", name)
    return re.sub(r"^model\.language_model\.", "model.", name)


# ---------------------------------------------------------------------------- safetensors I/O

class _Reader:
    """Memory-mapped tensors from one or more safetensors files, by hub name."""

    def __init__(self, files: list[Path]):
        self.tensors: dict[str, tuple[Path, Any, tuple[int, ...], int, int]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for path in files:
            n, header = _read_header(path)
            size = path.stat().st_size
            for stored, info in header.items():
                name = hub_name(stored)
                if name in self.tensors:
                    raise ValueError(f"tensor {name} appears twice in the checkpoint (as {stored!r})")
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: tensor {stored}: unsupported safetensors dtype {info['dtype']}")
                b, e = info["data_offsets"]
                want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
                # A file cut short (a copy or download that did not finish) would otherwise be read as a
                # shorter array and fail in a reshape that names neither the file nor the tensor.
                if not 0 <= b <= e or e - b != want or 8 + n + e > size:
                    raise ValueError(f"{path}: tensor {stored} needs bytes {b}..{e} of the data ({want} bytes for "
                                     f"shape {info['shape']}), the file holds {max(size - 8 - n, 0)}: the file "
                                     f"is cut short or damaged")
                self.tensors[name] = (path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + b, 8 + n + e)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][2]

    def get(self, name: str) -> np.ndarray:
        path, dtype, shape, b, e = self.tensors[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[path][b:e].view(dtype).reshape(shape)


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, tensor entries) of one safetensors file; ValueError naming the file when damaged."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, not a safetensors file (cut short or empty)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:  # checked before reading: a garbled length would ask for terabytes
            raise ValueError(f"{path}: header length {n} exceeds the file's {size} bytes (cut short or damaged)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        for info in header.values():
            _ = (info["dtype"], info["shape"], info["data_offsets"][1])
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: the safetensors header is not valid ({type(e).__name__}: {e})") from None
    return n, header


def _checkpoint_files(hf_dir: Path) -> list[Path]:
    if hf_dir.is_file() and hf_dir.suffix in _PICKLE_SUFFIXES:
        raise ValueError(f"{hf_dir} is a pickle checkpoint; convert it to safetensors first "
                         "(transformers: model.save_pretrained(dir, safe_serialization=True))")
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__}: {e})") from None
        for f in files:
            if not (hf_dir / f).is_file():
                raise FileNotFoundError(f"{hf_dir / f}, named by {index}, does not exist")
        return [hf_dir / f for f in files]
    if (hf_dir / "model.safetensors").exists():
        return [hf_dir / "model.safetensors"]
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{hf_dir} holds only pickle checkpoints ({', '.join(pickles)}); these are not loaded. "
                         "Convert to safetensors first (transformers: save_pretrained(dir, safe_serialization=True))")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}")


def _write_safetensors(path: Path, tensors: list[tuple[str, Callable[[], np.ndarray], tuple[int, ...], Any]]) -> None:
    """Streams tensors (name, producer, shape, dtype) to one file; one tensor in host memory at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, shape, dtype in tensors:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    # Via a temporary sibling renamed when complete: a kill or a full disk never leaves a cut-short file under
    # the final name (one that a reader would take for the model).
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, produce, shape, dtype in tensors:
                arr = np.ascontiguousarray(produce(), dtype=dtype)
                if arr.shape != tuple(shape):
                    raise ValueError(f"tensor {name}: produced shape {arr.shape}, planned {tuple(shape)}")
                f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
                kill_point("export.tensor_written")
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_failed(e, path) from e
        raise
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- load

def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _assign(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _read(reader: _Reader, entry: _Entry, index: tuple[slice, ...] | None, dtype: Any) -> np.ndarray:
    """Our-layout array (or the `index` slice of it) for one entry, read from the memmapped checkpoint."""
    if entry.layers is None:
        arr = entry.kind.to_ours(reader.get(entry.hf))
        return np.asarray(arr if index is None else arr[index]).astype(dtype)
    layers, rest = (slice(None), ()) if index is None else (index[0], tuple(index[1:]))
    return np.stack([np.asarray(entry.kind.to_ours(reader.get(entry.hf.format(i=i)))[rest]).astype(dtype)
                     for i in range(entry.layers)[layers]])


def load_hf(hf_dir: str | Path, dtype: Any = jnp.float32, param_dtype: Any = None, shardings: Any = None,
            remat: str = "none", scan_layers: bool = True) -> Qwen2_5_VL:
    """Qwen2_5_VL from an HF directory (config.json + safetensors), without random initialisation.

    param_dtype defaults to dtype. remat and scan_layers: as in `Qwen2_5_VL`. shardings: None (default device), a pytree of `jax.sharding.Sharding`
    matching `nnx.state(model)` (an nnx.State or its pure dict), or a callable
    `(path: tuple of keys, shape, logical_names) -> Sharding`; each device then reads only its slice.
    """
    hf_dir = Path(hf_dir)
    files = _checkpoint_files(hf_dir)
    cfg = Qwen2_5_VLConfig.from_hf_dir(hf_dir if hf_dir.is_dir() else hf_dir.parent)
    param_dtype = np.dtype(param_dtype or dtype)
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                                 scan_layers=scan_layers, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    names = nnx.to_pure_dict(nnx.get_partition_spec(state))
    if isinstance(shardings, nnx.State):
        shardings = nnx.to_pure_dict(shardings)
    reader = _Reader(files)
    entries = _entries(cfg)
    _check_names(reader, entries, cfg, hf_dir)
    for entry in _as_held(entries, pure):
        shape = _lookup(pure, entry.path).shape
        per_layer = shape if entry.layers is None else shape[1:]
        want = entry.kind.hf_shape(per_layer)
        for name in entry.hf_names():
            if reader.shape(name) != tuple(want):
                raise ValueError(f"tensor {name}: checkpoint shape {reader.shape(name)}, model expects {tuple(want)} "
                                 f"(in {reader.tensors[name][0]})")
        if shardings is None:
            if entry.layers is None:
                value = jax.device_put(_read(reader, entry, None, param_dtype))
            else:  # one layer on the host at a time
                value = jnp.stack([jax.device_put(_read(reader, dataclasses.replace(entry, layers=None,
                                                                                 hf=entry.hf.format(i=i)),
                                                        None, param_dtype)) for i in range(entry.layers)])
        else:
            sharding = (shardings(entry.path, shape, _lookup(names, entry.path)) if callable(shardings)
                        else _lookup(shardings, entry.path))
            value = jax.make_array_from_callback(shape, sharding,
                                                 lambda idx, e=entry: _read(reader, e, idx, param_dtype))
        _assign(pure, entry.path, value)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _check_names(reader: _Reader, entries: list[_Entry], cfg: Qwen2_5_VLConfig, hf_dir: Path) -> None:
    expected = {n for e in entries for n in e.hf_names()}
    missing = sorted(expected - set(reader.tensors))
    if missing:
        raise ValueError(f"checkpoint {hf_dir} is missing {len(missing)} tensor(s): {', '.join(missing[:10])}")
    unexpected = set(reader.tensors) - expected
    if cfg.tie_word_embeddings:
        unexpected.discard("lm_head.weight")  # tied: transformers ignores a stored copy too
    if unexpected:
        raise ValueError(f"checkpoint {hf_dir} has {len(unexpected)} unexpected tensor(s): {', '.join(sorted(unexpected)[:10])}")


# ---------------------------------------------------------------------------- save

def _flatten(tree: Any, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if hasattr(value, "items"):
            yield from _flatten(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value


def _host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_hf(model_or_state: Any, config: Qwen2_5_VLConfig | dict | None, out_dir: str | Path,
            tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 5 * 2**30, dtype: Any = None) -> Path:
    """Writes an HF directory: config.json, safetensors with hub names (sharded with
    model.safetensors.index.json when larger than max_shard_bytes), and tokenizer/processor files.

    model_or_state: a Qwen2_5_VL, its nnx.State, or the pure dict of it. config defaults to the model's.
    dtype: storage dtype of the written tensors (default: each parameter's own dtype). In a
    multi-process run every process must call this (gathers are collective); process 0 writes.
    """
    if isinstance(model_or_state, nnx.Module):
        config = config or model_or_state.config
        model_or_state = nnx.state(model_or_state, nnx.Param)
    pure = nnx.to_pure_dict(model_or_state) if isinstance(model_or_state, nnx.State) else model_or_state
    if config is None:
        raise ValueError("save_hf needs the config when given a state")
    cfg = config if isinstance(config, Qwen2_5_VLConfig) else Qwen2_5_VLConfig.from_hf_dict(config)
    entries = _as_held(_entries(cfg), pure, key=str)
    flat = dict(_flatten(pure))
    unexpected = set(flat) - {e.path for e in entries}
    if unexpected:
        raise ValueError(f"state has parameters the HF layout does not know: {sorted('.'.join(p) for p in unexpected)}")
    plan = []
    for e in entries:
        if e.path not in flat:
            raise ValueError(f"state is missing parameter {'.'.join(e.path)} (HF {e.hf})")
        arr = flat[e.path]
        per_layer = tuple(arr.shape) if e.layers is None else tuple(arr.shape[1:])
        if e.layers is not None and arr.shape[0] != e.layers:
            raise ValueError(f"parameter {'.'.join(e.path)}: {arr.shape[0]} stacked layers, config says {e.layers}")
        out_dtype = np.dtype(dtype or arr.dtype)
        for i, name in enumerate(e.hf_names()):
            def produce(arr=arr, i=i, e=e):
                return e.kind.to_hf(_host(arr if e.layers is None else arr[i]))
            plan.append((name, produce, tuple(e.kind.hf_shape(per_layer)), out_dtype))
    out_dir = Path(out_dir)
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)  # a killed export's cut-short files (never under a final name)
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = math.prod(item[2]) * item[3].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for fname, shard in zip(names, shards):
        if jax.process_index() == 0:
            _write_safetensors(out_dir / fname, shard)
            kill_point("export.file_written")
        else:  # still take part in the collective gathers
            for item in shard:
                item[1]()
    if jax.process_index() != 0:
        return out_dir
    if len(shards) > 1:
        weight_map = {item[0]: fname for fname, shard in zip(names, shards) for item in shard}
        total = sum(math.prod(item[2]) * item[3].itemsize for item in plan)
        write_text_atomic(out_dir / "model.safetensors.index.json",
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        kill_point("export.file_written")
    if tokenizer_dir is not None:
        for pattern in TOKENIZER_FILES:
            for src in Path(tokenizer_dir).glob(pattern):
                if src.is_file():
                    write_bytes_atomic(out_dir / src.name, src.read_bytes())
                    shutil.copystat(src, out_dir / src.name)
                    kill_point("export.file_written")
    # config.json last: a directory holding it (what every loader looks for first) holds the whole export,
    # every file renamed into place complete, even after a kill or a full disk part way through.
    dtypes = {item[3] for item in plan}
    cfg_dict = cfg.to_hf_dict(dtype=np.dtype(dtypes.pop()).name if len(dtypes) == 1 else None)
    write_text_atomic(out_dir / "config.json", json.dumps(cfg_dict, indent=2) + "\n")
    return out_dir
