"""The trainer's state and where it lives: fp32 master parameters (a pure dict, the layout Orbax checkpoints
use), the optax state, the number of applied updates and the number of skipped ones.

- parameters: NamedShardings from their logical axis names and the rules table (`sharding.py`);
- optimizer state: every optax leaf that mirrors a parameter (Adam's mu/nu, accumulators, ...) gets
  that parameter's sharding, found by matching tree paths and shapes; everything else (step counts,
  scalar hyper-parameters, factored statistics whose shape differs) is replicated.

`apply_gradients` is the one optimizer update: a non-finite loss or gradient leaves the state untouched and
counts a skip. The GRPO step's `UpdateFns.apply` jits it with the old state donated; `make_train_step` does the
same for any loss (`viper sft`'s answer-token loss, the sharding tests):

    step = make_train_step(lambda p, b: loss(nnx.merge(graphdef, p), b), optimizer, shardings)
    state, metrics = step(state, batch)
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from viper_jax.sharding import DEFAULT_RULES, batch_sharding, use_mesh

LossFn = Callable[[Any, Any], tuple[jax.Array, Any]]  # (params, batch) -> (scalar loss, aux pytree)


@partial(jax.tree_util.register_dataclass, data_fields=["step", "params", "opt_state", "skipped"],
         meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: Any       # int32 scalar: optimizer updates applied
    params: Any     # pure dict of fp32 master parameters
    opt_state: Any  # optax state for `params`
    skipped: Any    # int32 scalar: updates skipped for a non-finite loss or gradient


def _pure(params: Any) -> Any:
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _mesh_of(shardings: Any) -> Mesh:
    for s in jax.tree.leaves(shardings):
        if isinstance(s, NamedSharding):
            return s.mesh
    raise ValueError("no NamedSharding found: parameter shardings must come from a mesh")


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any) -> Any:
    """Shardings for an optax state (arrays or ShapeDtypeStructs, e.g. `jax.eval_shape(opt.init, params)`).

    A leaf whose tree path ends with a parameter's path and whose shape equals that parameter's takes
    the parameter's sharding (optax keeps moments as trees shaped like the parameters, under fields
    such as `.mu`); any other leaf is replicated."""
    mesh = _mesh_of(param_shardings)
    by_path: dict[tuple, tuple[tuple[int, ...], Any]] = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(_pure(abstract_params)),
                                      jax.tree.leaves(param_shardings)):
        by_path[tuple(path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, P())

    def one(path: tuple, leaf: Any) -> NamedSharding:
        path = tuple(path)
        for start in range(len(path)):  # longest suffix first
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def train_state_shardings(optimizer: optax.GradientTransformation, params: Any, param_shardings: Any) -> TrainState:
    """A TrainState of shardings. `params`: the parameter pytree (arrays or ShapeDtypeStructs, any dtype;
    the master copy is fp32), `param_shardings` a matching pytree of NamedShardings."""
    params = _pure(params)
    param_shardings = _pure(param_shardings)
    if jax.tree.structure(params) != jax.tree.structure(param_shardings):
        raise ValueError("param_shardings does not match the parameter tree")
    master = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, _master_dtype(x.dtype)), params)
    abstract_opt = jax.eval_shape(optimizer.init, master)
    replicated = NamedSharding(_mesh_of(param_shardings), P())
    return TrainState(step=replicated, params=param_shardings,
                      opt_state=opt_state_shardings(abstract_opt, master, param_shardings), skipped=replicated)


def _master_dtype(dtype: Any) -> Any:
    return jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype


def init_train_state(params: Any, optimizer: optax.GradientTransformation, shardings: TrainState,
                     donate: bool = True) -> TrainState:
    """The initial state, created directly in its sharded layout (optimizer state is never materialised
    on one device). `params` should already be placed with `shardings.params` (e.g. `load_hf(...,
    shardings=...)`); floating parameters are cast to fp32. With donate=True the input buffers are reused."""

    def init(p: Any) -> TrainState:
        p = jax.tree.map(lambda x: x.astype(_master_dtype(x.dtype)), p)
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                          skipped=jnp.zeros((), jnp.int32))

    fn = jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings,
                 donate_argnums=(0,) if donate else ())
    return fn(_pure(params))


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array, optimizer: optax.GradientTransformation
                    ) -> tuple[TrainState, jax.Array, jax.Array]:
    """(new state, grad_norm of the raw gradient, ok). One NaN/inf in the loss or anywhere in the gradient
    makes ok False: parameters and optimizer state stay as they were and `skipped` counts one more."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # one NaN/inf anywhere makes the norm non-finite
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    def keep(new: Any, old: Any) -> Any:  # elementwise select: XLA updates the donated buffers in place
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    new = TrainState(step=state.step + ok.astype(jnp.int32), params=keep(params, state.params),
                     opt_state=keep(opt_state, state.opt_state), skipped=state.skipped + (~ok).astype(jnp.int32))
    return new, grad_norm, ok


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
