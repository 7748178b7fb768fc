"""Meshes, rules and the train state on one device, plus the runs that need more devices than this
process has: the 8-device suite (tests/multidevice, in a subprocess with 8 simulated CPU devices) and
two processes on localhost forming one 8-device mesh with jax.distributed and gloo collectives."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from sharded_train_step import check_batch, process_slice, shard_batch
from viper_jax.sharding import (DEFAULT_RULES, batch_sharding, logical_to_spec, make_mesh, mesh_from_config,
                                mesh_shape, rules_from_config)
from viper_jax.train.state import init_train_state, make_train_step, opt_state_shardings, train_state_shardings

ROOT = Path(__file__).resolve().parents[1]
# Test-only: LLVM -O0 makes XLA:CPU compile the tiny model's backward pass ~3x faster; numerics stay fp32.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}


# ---------------------------------------------------------------------------- mesh and rules

def test_mesh_shape_resolves_the_rest_and_refuses_bad_sizes():
    assert mesh_shape((1, -1, 2), 8) == (1, 4, 2)
    assert mesh_shape((2, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="needs 4 devices, 8 are present"):
        mesh_shape((1, 2, 2), 8)
    with pytest.raises(ValueError, match="at most one"):
        mesh_shape((-1, -1, 1), 8)


def test_rules_from_config_overrides_defaults_and_refuses_unknown_axes():
    rules = dict(rules_from_config([["kv_heads", None], ["embed", ["fsdp", "data"]], ["experts", "tensor"]]))
    assert rules["kv_heads"] is None and rules["embed"] == ("fsdp", "data") and rules["experts"] == "tensor"
    assert rules["mlp"] == "tensor"  # untouched defaults stay
    with pytest.raises(ValueError, match="unknown mesh axes"):
        rules_from_config([["mlp", "model"]])


def test_logical_to_spec_uses_each_mesh_axis_once():
    assert logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("layers", "embed", "heads")) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("vision_tokens", "embed")) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",))


def test_mesh_from_config():
    mesh = mesh_from_config({"data": 1, "fsdp": -1})
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (1, 1, 1)
    with pytest.raises(ValueError, match="unknown axes"):
        mesh_from_config({"model": 1})


def test_process_slice_single_process():
    assert process_slice(6) == slice(0, 6)
    assert process_slice(6, batch_sharding(make_mesh((1, 1, 1)))) == slice(0, 6)


# ---------------------------------------------------------------------------- train state (one device)

def _toy():
    """Least squares: params {"w": [4, 3] (embed, mlp), "b": [3] (mlp)}, batch {"x", "y"}."""
    mesh = make_mesh((1, 1, 1))
    p_sh = {"w": NamedSharding(mesh, logical_to_spec(("embed", "mlp"))), "b": NamedSharding(mesh, P("tensor"))}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    batch = {"x": x, "y": x @ rng.normal(size=(4, 3)).astype(np.float32)}
    params = {"w": jnp.zeros((4, 3), jnp.bfloat16), "b": jnp.zeros((3,), jnp.bfloat16)}

    def loss(p, b):
        err = b["x"] @ p["w"] + p["b"] - b["y"]
        return jnp.mean(err**2), {"max_err": jnp.abs(err).max()}

    return mesh, p_sh, params, batch, loss


def test_optimizer_state_leaves_follow_their_parameters():
    mesh, p_sh, params, _, _ = _toy()
    optimizer = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), 2)
    shardings = train_state_shardings(optimizer, params, p_sh)
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings.opt_state)}
    assert specs == {
        ".mini_step": P(), ".gradient_step": P(), ".inner_opt_state[1][0].count": P(),
        ".inner_opt_state[1][0].mu['w']": P("fsdp", "tensor"), ".inner_opt_state[1][0].mu['b']": P("tensor"),
        ".inner_opt_state[1][0].nu['w']": P("fsdp", "tensor"), ".inner_opt_state[1][0].nu['b']": P("tensor"),
        ".acc_grads['w']": P("fsdp", "tensor"), ".acc_grads['b']": P("tensor")}
    # A leaf whose shape differs from its parameter's (e.g. factored statistics) is replicated.
    odd = opt_state_shardings({"mu": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}}, params, p_sh)
    assert odd["mu"]["w"].spec == P()


def test_train_step_fp32_master_decreases_loss_and_skips_nan():
    mesh, p_sh, params, batch, loss = _toy()
    optimizer = optax.adam(0.1)
    shardings = train_state_shardings(optimizer, params, p_sh)
    state = init_train_state(jax.device_put(params, p_sh), optimizer, shardings)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}  # fp32 master copy
    step = make_train_step(loss, optimizer, shardings)
    losses = []
    for _ in range(20):
        old = state
        state, metrics = step(state, shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
        assert old.params["w"].is_deleted()
    assert losses[-1] < 0.2 * losses[0] and set(metrics) == {"loss", "grad_norm", "skipped", "aux"}
    kept = jax.device_get(state.params)
    state, metrics = step(state, shard_batch(dict(batch, y=np.full_like(batch["y"], np.inf)), mesh))
    assert bool(metrics["skipped"]) and int(state.skipped) == 1 and int(state.step) == 20
    np.testing.assert_array_equal(jax.device_get(state.params)["w"], kept["w"])


def test_batch_that_does_not_split_is_refused():
    mesh = AbstractMesh((2, 2, 1), ("data", "fsdp", "tensor"))  # a shape is enough: no devices needed
    check_batch(8, mesh)
    with pytest.raises(ValueError, match="global batch 6 does not divide over mesh axes dataxfsdp of size 4"):
        check_batch(6, mesh)


# ---------------------------------------------------------------------------- more devices: subprocesses

def test_eight_device_suite():
    """tests/multidevice/*: parity on five meshes, shard shapes, bytes per device, sharded load_hf,
    errors before compile, the sharded train step. One subprocess, so compiled code is shared."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s",
                          str(ROOT / "tests" / "multidevice")], env=_env(8), cwd=ROOT, capture_output=True,
                         text=True, timeout=400)
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
    """Two processes x 4 CPU devices, jax.distributed + gloo: one forward+backward on the global
    (2, 2, 2) mesh equals the single-device result (computed by process 0 on its own first device)."""
    port, out = _free_port(), tmp_path / "result.npz"
    worker = ROOT / "tests" / "multidevice" / "two_process_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), str(out)], env=_env(4), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for i in range(2)]
    logs = []
    try:
        deadline = time.monotonic() + 300
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:  # never leave a worker behind (each runs in its own process group)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(log[-3000:] for log in logs)
    assert "process 0: rows 0:4 ok" in logs[0] and "process 1: rows 4:8 ok" in logs[1]
    data = np.load(out)
    keys = [k[len("got/"):] for k in data.files if k.startswith("got/")]
    assert len(keys) > 30 and any("logits" in k for k in keys)
    for key in keys:
        np.testing.assert_allclose(data["got/" + key], data["ref/" + key], rtol=1e-5, atol=1e-5, err_msg=key)
