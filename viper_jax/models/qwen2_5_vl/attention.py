"""Grouped-query attention for the decoder and the vision tower, with a hand-written backward.

Without a KV cache, attention runs as batched matmuls in the canonical [batch, m, k] x [batch, k, n] form,
the queries of a K/V head's G heads stacked along m ([B, K, G*T, d]), and its backward is written out:
  dV = (dO^T P)^T,  dP = dO V^T,  dS = P (dP - rowsum(dO o O)) scale,  dQ = dS K,  dK = (Q^T dS)^T.
Autodiff of the same einsums makes XLA:CPU transpose the [G*T, S] probabilities and scores (a full
pass each, per layer) to bring every matmul into that form; here only the small [*, d] operands are
transposed (0.915x the benchmark decoder's forward + backward time, gradients equal to 5e-6).
rowsum(dO o O) = rowsum(P o dP) is flash attention's identity: a reduction over d instead of S.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

# A masked score. Finite, so a fully masked row (a left-pad query) gets a uniform average over all keys,
# as HF's additive fp32-minimum mask gives it, instead of NaNs.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
           heads_first: bool = False, query_chunk: int = 0) -> jax.Array:
    """Grouped attention without repeating K/V.

    q [B, T, K, G, d] (query head j = k * G + g uses K/V head k, as HF's repeat_kv), k/v [B, S, K, d]
    ([B, K, S, d] with heads_first, the KV-cache layout, which lets the batched matmuls read the cache
    without a transpose), mask [B, T, S] or broadcastable (True = attend). Scores and softmax in fp32
    as HF's eager path, probabilities cast to v's dtype for P @ V.

    query_chunk > 0 attends `query_chunk` queries at a time (`lax.map` over rematerialised chunks), so the
    fp32 scores held at once, forward or backward, are [B, H, query_chunk, S] instead of [B, H, T, S]:
    at 5120 positions and 28 heads that is 2.9 GB per row unchunked. Same result, one more score pass.
    """
    t = q.shape[1]
    if query_chunk and t > query_chunk:
        return _attend_chunked(q, k, v, mask, scale, heads_first, query_chunk)
    if not heads_first:
        s = k.shape[1]
        mask = jnp.ones((1, t, s), bool) if mask is None else jnp.broadcast_to(mask, (mask.shape[0], t, s))
        return _grouped_attention(q, k, v, mask, scale)
    logits = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if t == 1:
        # One decode token: probs @ V is B*K tiny [G, S] x [S, d] products, which XLA:CPU runs as a
        # batched dot at ~5 GFLOP/s (a quarter of a CPU decode step); a fused multiply + reduce over S
        # is 2.3x faster for the whole attention and gives the same sums to fp32 rounding.
        out = jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None], axis=3, dtype=jnp.float32)
        return out.astype(v.dtype)[:, None]
    return jnp.einsum("bkgts,bksd->btkgd", probs, v)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, K, m, n] @ [B, K, n, p] with fp32 accumulation and result."""
    return jnp.einsum("bkmn,bknp->bkmp", a, b, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q [B, T, K, G, d], k/v [B, S, K, d], mask [B or 1, T, S] -> [B, T, K, G, d]."""
    return _forward(q, k, v, mask, scale)[0]


def _forward(q, k, v, mask, scale):
    b, t, kvh, g, d = q.shape
    qm = q.transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)  # [B, K, G*T, d]
    kt = k.transpose(0, 2, 3, 1)  # [B, K, d, S]
    vm = v.transpose(0, 2, 1, 3)  # [B, K, S, d]
    scores = (_mm(qm, kt) * scale).reshape(b, kvh, g, t, -1)
    scores = jnp.where(mask[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kvh, g * t, -1)
    out = _mm(probs.astype(v.dtype), vm).astype(q.dtype)  # [B, K, G*T, d]
    return out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4), (qm, kt, vm, mask, probs, out)


def _backward(scale, residuals, d_out):
    qm, kt, vm, mask, probs, out = residuals
    b, t, kvh, g, d = d_out.shape
    do = d_out.transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    dp = _mm(do, vm.swapaxes(-1, -2))
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (probs * (dp - delta) * scale).reshape(b, kvh, g, t, -1)
    # Masked scores get no gradient (in a fully masked row their probabilities are not 0).
    ds = jnp.where(mask[:, None, None], ds, 0.0).reshape(b, kvh, g * t, -1).astype(qm.dtype)
    dq = _mm(ds, kt.swapaxes(-1, -2)).astype(qm.dtype).reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4)
    dk = _mm(qm.swapaxes(-1, -2), ds).astype(kt.dtype).transpose(0, 3, 1, 2)  # [B, K, d, S] -> [B, S, K, d]
    dv = _mm(do.swapaxes(-1, -2), probs.astype(vm.dtype)).astype(vm.dtype).transpose(0, 3, 1, 2)
    return dq, dk, dv, None


_grouped_attention.defvjp(_forward, _backward)


def _attend_chunked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
                    heads_first: bool, chunk: int) -> jax.Array:
    b, t = q.shape[:2]
    n = -(-t // chunk)
    pad = n * chunk - t  # padded queries see no key; their rows are dropped below
    if mask is None:
        kv_len = k.shape[2] if heads_first else k.shape[1]
        mask = jnp.ones((1, t, kv_len), bool)
    mask = jnp.broadcast_to(mask, (mask.shape[0], t, mask.shape[-1]))
    qs = jnp.pad(q, ((0, 0), (0, pad)) + ((0, 0),) * (q.ndim - 2))
    ms = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    qs = qs.reshape(b, n, chunk, *q.shape[2:]).swapaxes(0, 1)  # [n, B, chunk, K, G, d]
    ms = ms.reshape(ms.shape[0], n, chunk, ms.shape[-1]).swapaxes(0, 1)
    one = jax.checkpoint(lambda args: attend(args[0], k, v, args[1], scale, heads_first), prevent_cse=False)
    out = jax.lax.map(one, (qs, ms)).swapaxes(0, 1)  # [B, n, chunk, K, G, d]
    return out.reshape(b, n * chunk, *out.shape[3:])[:, :t]
