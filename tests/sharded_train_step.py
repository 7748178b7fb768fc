"""A generic sharded train step (any loss -> the donated, sharded TrainState update) and a batch placed from
each process's own rows, for the sharding tests (not a test module). `viper train` runs the GRPO step's own
update (viper_jax/train/grpo_step.py: UpdateFns); both apply the gradients through `train.state.apply_gradients`.

    step = make_train_step(lambda p, b: loss(nnx.merge(graphdef, p), b), optimizer, shardings)
    state, metrics = step(state, shard_batch(local_rows, mesh))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from viper_jax.sharding import DEFAULT_RULES, batch_sharding, path_str, use_mesh
from viper_jax.train.state import TrainState, apply_gradients

LossFn = Callable[[Any, Any], tuple[jax.Array, Any]]  # (params, batch) -> (scalar loss, aux pytree)


def _mesh_of(shardings: Any) -> Mesh:
    return next(s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, shardings: TrainState,
                    batch_shardings: Any = None, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]:
    """`step(state, batch) -> (state, metrics)`, jitted with explicit shardings, the state donated.

    loss_fn(params, batch) -> (loss, aux) runs with the mesh and `rules` active, so the model's
    activation constraints apply. batch_shardings: a pytree (or prefix) of shardings for the batch;
    default: every leaf's leading axis split over the batch mesh axes. metrics: loss, grad_norm (of the
    raw gradient), skipped (this step, bool), aux.
    """
    mesh = _mesh_of(shardings.params)
    if batch_shardings is None:
        batch_shardings = batch_sharding(mesh, rules)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        with use_mesh(mesh, rules):  # traced here, so the constraints are part of this program
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        # Gradients live where their parameters live (a reduce-scatter over the batch axes, not an all-reduce).
        grads = jax.lax.with_sharding_constraint(grads, shardings.params)
        new, grad_norm, ok = apply_gradients(state, grads, loss, optimizer)
        return new, {"loss": loss, "grad_norm": grad_norm, "skipped": ~ok, "aux": aux}

    return jax.jit(step, in_shardings=(shardings, batch_shardings), out_shardings=(shardings, None),
                   donate_argnums=(0,))


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
