"""Meshes and logical-axis sharding rules.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, ...). A rules table maps each logical
name to mesh axes (`data`, `fsdp`, `tensor`), as MaxText does, so one model definition runs on one CPU,
a GPU host or a TPU pod slice; only the mesh shape and the rules change, both from config.

Activations are constrained at layer boundaries with `constrain(x, names)`, which is a no-op unless a
mesh is active (`with use_mesh(mesh, rules):`), so single-device code needs no mesh at all. The
mesh is looked up when a function is traced: enter `use_mesh` inside the function you jit (as
the GRPO step's `UpdateFns` do), or before its first call.

Config keys (see docs/sharding.md): `mesh` = {data, fsdp, tensor} sizes (one may be -1, "the rest"),
`sharding_rules` = [[logical name, mesh axis | [mesh axes] | None], ...] overriding DEFAULT_RULES.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis or axes (None: replicated). Order of preference per name; a mesh axis is
# used at most once per array (the first dimension that claims it wins, later ones stay replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    # The vision tower's flat [N, D] patch sequence (all images of the batch): split like a batch.
    ("vision_tokens", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_heads", "tensor"),
)


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 ("the rest") and checks the product equals the device count."""
    sizes = [int(s) for s in sizes]
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh needs {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{num_devices} are present")
    return tuple(sizes)


def make_mesh(sizes: Sequence[int] = (1, -1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes.

    `tensor` is the last axis: create_device_mesh gives the last axes the fastest interconnect (the
    innermost ICI ring on TPU, NVLink peers on GPU), which tensor parallelism needs most.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices if d.platform == "tpu"})
    if slices > 1:  # multi-slice TPU: only `data` crosses the slower data-centre network
        if shape[0] % slices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: data={shape[0]} must be a multiple of the "
                             f"{slices} TPU slices (only the data axis spans slices)")
        grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1), devices,
                                                    allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        # Abstract or unusual device sets without a physical layout: plain row-major order.
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None] | None, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """Logical axis names -> PartitionSpec of mesh axes."""
    if names is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _axes_size(mesh: Mesh, entry: Any) -> tuple[int, tuple[str, ...]]:
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return math.prod(mesh.shape[a] for a in axes), axes


def check_divisible(path: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    """A clear error, before any compile, when a sharded dimension does not divide by its mesh axes."""
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        parts, axes = _axes_size(mesh, entry)
        if size % parts:
            raise ValueError(f"parameter {path}: dimension {dim} of size {size} is sharded over mesh axis "
                             f"{'x'.join(axes)} of size {parts}, which does not divide it; change the mesh "
                             f"or the sharding rules")


def path_str(path: Sequence[Any]) -> str:
    """A tree path as dotted names, e.g. language_model.layers.self_attn.q_proj.kernel."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_shardings(logical_specs: Any, shapes: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a pytree, given a matching pytree of logical PartitionSpecs (as returned by
    `nnx.get_partition_spec`) and of arrays / ShapeDtypeStructs; validates divisibility per leaf."""

    def one(path, names, leaf):
        spec = logical_to_spec(tuple(names) if names is not None else None, rules)
        check_divisible(path_str(path), leaf.shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, logical_specs, shapes,
                                            is_leaf=lambda x: isinstance(x, P) or x is None)


def check_head_counts(counts: Sequence[tuple[str, str, int]], mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> None:
    """(what, logical name, count) triples, e.g. ("text kv heads", "kv_heads", 4).

    Projection kernels store heads flattened (heads * head_dim), so the per-array check passes even
    when a device would get a fraction of a head; attention then needs extra collectives on every
    layer. This check refuses that up front."""
    for what, name, count in counts:
        parts, axes = _axes_size(mesh, logical_to_spec((name,), rules)[0])
        if count % parts:
            raise ValueError(f"{what}: {count} heads do not divide over mesh axis {'x'.join(axes)} of size "
                             f"{parts} (logical axis {name!r}); use a smaller tensor axis, or set the rule "
                             f"[{name!r}, None] to replicate them")


def model_head_counts(config: Any) -> list[tuple[str, str, int]]:
    """Head counts of a Qwen2.5-VL-style config (`.text`, `.vision`); empty for anything else."""
    out = []
    text, vision = getattr(config, "text", None), getattr(config, "vision", None)
    if text is not None:
        out += [("text attention heads", "heads", text.num_attention_heads),
                ("text kv heads", "kv_heads", text.num_key_value_heads)]
    if vision is not None:
        out.append(("vision heads", "heads", vision.num_heads))
    return out


def param_shardings(model: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict:
    """NamedShardings (a pure dict, like `nnx.to_pure_dict(nnx.state(model))`) for every parameter of
    an NNX model (real or `nnx.eval_shape`-abstract), from its logical names and the rules. Raises
    before any compile when a dimension or a head count does not divide its mesh axes."""
    check_head_counts(model_head_counts(getattr(model, "config", None)), mesh, rules)
    state = nnx.state(model, nnx.Param)
    return tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(state)), nnx.to_pure_dict(state), mesh, rules)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an input whose leading axis is the batch (other axes replicated)."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules))


def batch_shard_count(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> int:
    """How many ways the logical batch axis splits on `mesh` (the product of its mesh axes' sizes)."""
    spec = logical_to_spec(("batch",), rules)
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(int(mesh.shape[a]) for a in axes)


_ACTIVE: list[tuple[Mesh, tuple]] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Iterator[Mesh]:
    """Makes `constrain` active for code traced inside the block."""
    _ACTIVE.append((mesh, tuple(rules)))
    try:
        yield mesh
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity when no mesh is active."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def rules_from_config(pairs: Any, base: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> tuple[tuple[str, Any], ...]:
    """`base` with the config's [name, axes] pairs applied (axes: a mesh axis, a list of them, or None).
    A listed name replaces its base rule in place; new names are appended. Unknown mesh axes are errors."""
    table = dict(base)
    for name, axes in pairs or ():
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            unknown = [a for a in axes if a not in MESH_AXES]
        else:
            unknown = [axes] if axes is not None and axes not in MESH_AXES else []
        if unknown:
            raise ValueError(f"sharding rule {name!r} names unknown mesh axes {unknown}; mesh axes: {MESH_AXES}")
        table[str(name)] = axes
    return tuple(table.items())


def mesh_from_config(cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """`cfg`: a {data, fsdp, tensor} mapping (missing axes are 1) or a 3-sequence; -1 means "the rest"."""
    if isinstance(cfg, Mapping) or hasattr(cfg, "items"):
        unknown = sorted(set(dict(cfg.items())) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"mesh config names unknown axes {unknown}; mesh axes: {MESH_AXES}")
        sizes = [int(cfg.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(v) for v in cfg]
    return make_mesh(sizes, devices)
