"""Packed rows (train/packing.py) through the compiled programs: splash attention (Pallas interpret mode on this
CPU) on rows of several segments equals the xla path, kernel and whole update; the jitted packed update equals
the jitted padded one (tests/test_packing.py runs the same functions op by op).

Tolerances (fp32): packed vs padded, both xla, 1e-5 as in test_packing.py; splash vs xla 2e-5 for the kernel
and 5e-5 for the model's gradients, as in test_attention_kernels.py (the kernel's online softmax sums in
another order)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_attention_kernels import D, _check, _qkv  # the kernel check: forward and q/k/v gradients vs xla
from test_packing import G, N, fns_for, make_world
from viper_jax.models.qwen2_5_vl import Qwen2_5_VL
from viper_jax.models.qwen2_5_vl.attention_kernels import splash_attend
from viper_jax.train import packing
from viper_jax.train.grpo_batch import response_mask, update_inputs

TOL = dict(atol=1e-5, rtol=1e-5)
KERNEL_TOL = dict(atol=5e-5, rtol=5e-5)


def _packed_segments(t: int, rows: list[list[int]]) -> jnp.ndarray:
    """Segment ids [len(rows), t]: each row's segments of the given lengths, numbered 1, 2, ..., then padding 0
    (pack_micro's layout)."""
    seg = np.zeros((len(rows), t), np.int32)
    for r, lengths in enumerate(rows):
        at = 0
        for s, n in enumerate(lengths, start=1):
            seg[r, at:at + n] = s
            at += n
    return jnp.asarray(seg)


def test_splash_equals_xla_on_packed_rows_of_several_segments():
    """Three 128-blocks a row: segments that start and end inside blocks and span block edges, a one-token
    segment, trailing padding, and a row with no padding; outputs and q/k/v gradients at real tokens."""
    t = 384
    q, k, v = _qkv(t=t, seed=11)
    seg = _packed_segments(t, [[100, 150, 1, 89], [300, 84]])  # row 0: 44 pads at the end; row 1: none
    assert int(seg.max()) == 4 and int((seg == 0).sum()) == 44
    _check(lambda *a: splash_attend(*a, interpret=True), q, k, v, seg, D**-0.5)


@pytest.fixture(scope="module")
def world():
    """test_packing's tiny model and 4-prompt batch, every group counted (its dropped group restored), and a
    splash twin of the model: the same parameters, attention="splash"."""
    config, graphdef, params, ref, batch = make_world()
    lengths = np.asarray([12, 1, 5, 3, 3, 3, 7, 2, 11, 6, 1, 9])
    batch = dataclasses.replace(batch, resp_mask=response_mask(lengths, N))
    splash_graphdef, _ = nnx.split(Qwen2_5_VL(config, attention="splash", rngs=nnx.Rngs(0)))
    return (config, graphdef, params, ref, batch), splash_graphdef


def _accumulate(fns, params, micros, denoms):
    acc, loss = fns.zeros(params), 0.0
    for m in micros:
        acc, part = fns.accumulate(params, acc, m.inputs, denoms)
        loss += float(part["loss"])
    return loss, jax.device_get(acc)


def test_jitted_packed_update_equals_padded_with_xla_and_splash(world):
    """UpdateFns.accumulate, compiled: one padded micro-batch of the 4 prompts vs the same prompts packed into
    rows of several segments, with the xla decoder and with splash; loss and every gradient."""
    base, splash_graphdef = world
    config, graphdef, params, _, batch = base
    fns, *_ = fns_for(base, aggregation="seq-mean-token-mean")
    noise = np.random.default_rng(3).normal(0, 0.3, batch.old_logp.shape).astype(np.float32)
    logp = np.asarray(fns.logprobs(params, update_inputs(batch, 0, 4, config)))
    batch = dataclasses.replace(batch, old_logp=(logp + noise) * batch.resp_mask)
    denoms = {"tokens": jnp.float32(batch.resp_mask.sum()), "seqs": jnp.float32(4 * G), "norm_length": jnp.float32(N)}

    padded = _accumulate(fns, params, [packing.padded_micro(batch, 0, 4, update_inputs(batch, 0, 4, config))], denoms)
    micros = packing.pack_minibatch(batch, 0, 4, config, max_rows=64)
    assert len(micros) == 1 and micros[0].inputs["segment_ids"].max() >= 2  # rows hold several sequences
    assert micros[0].processed < micros[0].inputs["segment_ids"].size  # and the rows pad less than the padded ones
    packed = _accumulate(fns, params, micros, denoms)

    splash_base = (config, splash_graphdef, params, None, batch)
    splash_fns, *_ = fns_for(splash_base, aggregation="seq-mean-token-mean")
    splash = _accumulate(splash_fns, params, micros, denoms)

    assert abs(padded[0]) > 1e-3
    np.testing.assert_allclose(packed[0], padded[0], **TOL)
    np.testing.assert_allclose(splash[0], packed[0], **KERNEL_TOL)
    leaves = jax.tree_util.tree_flatten_with_path(padded[1])[0]
    assert max(float(np.abs(a).max()) for _, a in leaves) > 1e-3
    for (path, a), b, c in zip(leaves, jax.tree.leaves(packed[1]), jax.tree.leaves(splash[1])):
        np.testing.assert_allclose(b, a, **TOL, err_msg=f"packed {jax.tree_util.keystr(path)}")
        np.testing.assert_allclose(c, b, **KERNEL_TOL, err_msg=f"splash {jax.tree_util.keystr(path)}")


UNEVEN_SCRIPT = """
import sys
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np
from test_attention_kernels import _check, _qkv, D
from test_packed_kernels import _packed_segments
from viper_jax.models.qwen2_5_vl.attention_kernels import splash_attend
from viper_jax.sharding import make_mesh, use_mesh

assert jax.device_count() == 4
q, k, v = (jnp.concatenate([x, x[:1]]) for x in _qkv(seed=12))  # 3 rows: they do not divide over 4 devices
seg = _packed_segments(128, [[40, 60], [128], [7, 100]])
mesh = make_mesh((1, 4, 1))
splash = lambda *a: splash_attend(*a, interpret=True)
with use_mesh(mesh):
    _check(jax.jit(splash), q, k, v, seg, D**-0.5)  # forward and gradients equal xla's
    jaxpr = jax.make_jaxpr(splash)(q, k, v, seg, D**-0.5)
(eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
qkv = [(spec, x.aval.shape) for spec, x in zip(eqn.params["in_specs"], eqn.invars) if x.aval.ndim == 4]
assert len(qkv) == 3 and all(spec[0] is not None and shape[0] == 4 for spec, shape in qkv), qkv  # padded to 4, split
print("OK")
"""


def test_splash_splits_a_batch_the_devices_do_not_divide():
    """3 packed rows over 4 devices (fsdp=4): splash pads the batch to 4 rows of segment -1 and splits it over
    the devices (unsplit, every device ran the kernel on every row: docs/plan.md), with outputs and gradients
    equal to xla's. In a subprocess: the device count must be set before JAX starts."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", UNEVEN_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
