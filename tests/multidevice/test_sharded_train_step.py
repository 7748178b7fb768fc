"""On 8 devices, mesh (2, 2, 2): the sharded train state and its jitted, donated update on the tiny
model: optimizer state sharded like the parameters, loss decreases, a NaN loss skips the update."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sharded_tiny import abstract_model, batch_shardings, loss_fn
from viper_jax.sharding import make_mesh, param_shardings
from viper_jax.train.state import init_train_state, make_train_step, train_state_shardings


@pytest.fixture(scope="module")
def setup(tiny):
    cfg, graphdef, params, batch = tiny
    mesh = make_mesh((2, 2, 2))
    p_sh = param_shardings(abstract_model(cfg), mesh)
    optimizer = optax.adamw(3e-3, weight_decay=0.01)
    shardings = train_state_shardings(optimizer, params, p_sh)
    b_sh = batch_shardings(mesh, batch)
    step = make_train_step(loss_fn(graphdef), optimizer, shardings, b_sh)
    return mesh, p_sh, shardings, step, jax.device_put(batch, b_sh), optimizer


def test_optimizer_state_is_sharded_like_the_parameters(tiny, setup):
    _, _, params, _ = tiny
    mesh, p_sh, shardings, _, _, optimizer = setup
    adam = shardings.opt_state[0]  # adamw = chain(scale_by_adam, add_decayed_weights, scale)
    assert adam.mu == p_sh and adam.nu == p_sh
    assert adam.count.spec == P() and shardings.step.spec == P()
    state = init_train_state(jax.device_put(params, p_sh), optimizer, shardings)
    mu = state.opt_state[0].mu["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert mu.sharding == p_sh["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert mu.addressable_shards[0].data.shape == (2, 64, 128)  # [layers, embed/fsdp, mlp/tensor]


def test_loss_decreases_buffers_donated_nan_skips(tiny, setup, compiles):
    _, _, params, batch = tiny
    mesh, p_sh, shardings, step, dev_batch, optimizer = setup
    state = init_train_state(jax.device_put(params, p_sh), optimizer, shardings)
    losses = []
    for _ in range(4):
        old = state
        state, metrics = step(state, dev_batch)
        losses.append(float(metrics["loss"]))
        assert jax.tree.leaves(old.params)[0].is_deleted()  # donated: updated in place
        assert not bool(metrics["skipped"])
    print("losses", losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert int(state.step) == 4 and int(state.skipped) == 0

    before = jax.device_get(state.params)
    poisoned = dict(dev_batch, pixel_values=jax.device_put(np.full(batch["pixel_values"].shape, np.nan, np.float32),
                                                           dev_batch["pixel_values"].sharding))
    n_compiles = len(compiles)
    state, metrics = step(state, poisoned)
    assert np.isnan(float(metrics["loss"])) and bool(metrics["skipped"])
    assert int(state.step) == 4 and int(state.skipped) == 1
    assert int(state.opt_state[0].count) == 4  # the optimizer did not step either
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
    assert len(compiles) == n_compiles  # same program, no recompile
    state, metrics = step(state, dev_batch)  # and training goes on from where it was
    assert float(metrics["loss"]) < losses[-1] and int(state.step) == 5
