"""A batch placed from each process's own rows, for the sharding tests (not a test module); the sharded
train step itself is `viper_jax.train.state.make_train_step` (`viper sft` runs it in production).

    step = make_train_step(lambda p, b: loss(nnx.merge(graphdef, p), b), optimizer, shardings)
    state, metrics = step(state, shard_batch(local_rows, mesh))
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from viper_jax.sharding import DEFAULT_RULES, batch_sharding, path_str


def _batch_parts(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> tuple[int, str]:
    axes = [a for a in jax.tree.leaves(tuple(batch_sharding(mesh, rules).spec))]
    return int(np.prod([mesh.shape[a] for a in axes])), "x".join(axes)


def check_batch(global_batch: int, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> None:
    """A clear error, before any compile, when the global batch does not split over the batch mesh axes."""
    parts, axes = _batch_parts(mesh, rules)
    if global_batch % parts:
        raise ValueError(f"global batch {global_batch} does not divide over mesh axes {axes} of size {parts}")


def shard_batch(local: Any, mesh: Mesh, global_batch: int | None = None,
                rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """Global arrays, leading axis split over the batch mesh axes, from this process's rows only
    (`process_slice(global_batch, batch_sharding(mesh))` says which rows those are).
    global_batch defaults to what JAX infers from the local rows and the mesh."""
    sharding = batch_sharding(mesh, rules)

    def one(path: Any, x: Any) -> jax.Array:
        x = np.asarray(x)
        if global_batch is None:
            out = jax.make_array_from_process_local_data(sharding, x)
            rows = out.shape[0]
        else:
            rows, out = global_batch, None
        try:
            check_batch(rows, mesh, rules)
        except ValueError as e:
            raise ValueError(f"batch leaf {path_str(path)}: {e}") from None
        return out if out is not None else jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(one, local)


def process_slice(global_batch: int, sharding: Any = None) -> slice:
    """The rows of a global batch this process feeds (each process loads only its own slice).

    With `sharding` (of the batch, e.g. `sharding.batch_sharding(mesh)`): the rows this process's
    devices hold under it, which is what `jax.make_array_from_process_local_data` expects; when the
    batch axes do not span processes, that is every row. Without it: equal contiguous blocks by
    process index (right for the default meshes, whose batch axes are the outer ones)."""
    if sharding is not None:
        starts = sorted({(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
                         for idx in sharding.addressable_devices_indices_map((global_batch,)).values()})
        lo, hi = starts[0][0], max(stop for _, stop in starts)
        covered = np.zeros(global_batch, bool)
        for a, b in starts:
            covered[a:b] = True
        if not covered[lo:hi].all():
            raise ValueError(f"this process's batch rows are not contiguous under {sharding}: {starts}")
        return slice(lo, hi)
    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} does not divide over {count} processes")
    per = global_batch // count
    return slice(index * per, (index + 1) * per)
