"""attention.attend's hand-written backward against autodiff of the textbook computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viper_jax.models.qwen2_5_vl.attention import attend


def _reference(q, k, v, mask, scale):
    """HF eager attention with repeat_kv: per head, fp32 scores, masked to the fp32 minimum, softmax.

    The mask is a select, not HF's addition: both give the same values, but through an addition autodiff
    sends a fully masked row's (rounding-dominated) score gradients into q and k."""
    b, t, kvh, g, d = q.shape
    kr, vr = (jnp.repeat(x, g, axis=2) for x in (k, v))  # [B, S, H, d], head j uses K/V head j // g
    scores = jnp.einsum("bthd,bshd->bhts", q.reshape(b, t, kvh * g, d), kr).astype(jnp.float32) * scale
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, vr).reshape(q.shape)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    b, t, s, kvh, g, d = 2, 9, 12, 2, 3, 8
    q = jnp.asarray(rng.normal(size=(b, t, kvh, g, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kvh, d)), jnp.float32) for _ in range(2))
    mask = rng.random((b, t, s)) > 0.4
    mask[0, 2] = False  # a fully masked query row (a left-pad query): a uniform average, as in HF
    mask[1, :, 0] = True
    return q, k, v, jnp.asarray(mask), 0.35


def test_forward_matches_hf_eager_attention(inputs):
    q, k, v, mask, scale = inputs
    got = attend(q, k, v, mask, scale)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(q, k, v, mask, scale)), atol=2e-6, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(got[0, 2]), np.asarray(v[0].mean(0))[:, None].repeat(3, 1), atol=2e-6)


def test_gradients_match_autodiff(inputs):
    """d(sum(w * attend)) for random w: q, k and v gradients equal autodiff of the reference within 1e-5,
    including the masked scores of a fully masked row, which get no gradient in either."""
    q, k, v, mask, scale = inputs
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(w * f(q, k, v, mask, scale)), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grad(attend), grad(_reference)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_bf16_inputs_give_bf16_outputs_and_gradients_close_to_fp32(inputs):
    """bf16 q, k, v: bf16 output and gradients, each within bf16 rounding (2% of its largest value; measured
    0.3-0.6%) of the fp32 reference's on the same (bf16-rounded) inputs, for a random cotangent."""
    q, k, v, mask, scale = inputs
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    w = np.random.default_rng(2).normal(size=q.shape).astype(np.float32)
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask, scale), *bf)
    grads = vjp(jnp.asarray(w, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    ref, ref_vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, mask, scale), *[x.astype(jnp.float32) for x in bf])
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.05
    for name, got, want in zip("qkv", grads, ref_vjp(jnp.asarray(w))):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=0,
                                   atol=0.02 * float(np.abs(want).max()), err_msg=f"d{name}")
