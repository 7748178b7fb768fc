"""GRPO pieces as pure functions: group advantages, token log-probs, the clipped policy loss, KL
estimators, entropy and loss aggregation. Formulas: shared/reference/qwen2_5_vl_grpo_diffusers.md §C.

Shapes: N responses (= prompts x group size), T response positions, V vocabulary. `mask` [N, T] is 1 on
response tokens that count (not padding, not after the end token).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "k2", "k3"]


def group_advantages(rewards: jax.Array, group_size: int, *, scale: str = "group",
                     eps: float = 1e-6) -> jax.Array:
    """(r - mean_group) / (std_group + eps), broadcast later to every token of a response.

    Rows are grouped consecutively: rewards[g*G:(g+1)*G] belong to prompt g. std is unbiased (Bessel), as
    in verl and EasyR1. scale: "group" (GRPO), "batch" (std over the whole batch), "none" (Dr. GRPO).
    """
    n = rewards.shape[0]
    if n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of {group_size}")
    if group_size < 2:
        raise ValueError("GRPO needs a group size of at least 2 to compare responses")
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.astype(jnp.float32).std(ddof=1) + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r}; use group, batch or none")
    return centred.reshape(n)


def zero_spread_groups(rewards: jax.Array, group_size: int, tol: float = 1e-6) -> jax.Array:
    """[N] bool: True for responses whose group's rewards are all equal (no learning signal)."""
    r = rewards.reshape(-1, group_size)
    flat = (r.max(axis=1) - r.min(axis=1)) <= tol
    return jnp.repeat(flat, group_size)


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / T)[targets], in fp32. logits [N, T, V], targets [N, T].

    As z[target] - logsumexp(z) rather than a gather from the whole log-softmax, whose backward takes
    more passes over [N, T, V]: lm_head + loss forward + backward 238 vs 359 ms on XLA:CPU at 1076
    positions x 512 x 8192 vocabulary (transformers' cross_entropy: 317 ms)."""
    z = logits.astype(jnp.float32) / temperature
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def entropy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """H = logsumexp(z) - sum softmax(z) z, per position (verl's entropy_from_logits)."""
    z = logits.astype(jnp.float32) / temperature
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: KLKind = "k3") -> jax.Array:
    """Per-token KL(pi || ref) estimators with delta = log ref - log pi, clamped as verl does."""
    delta = jnp.clip(ref_logp - logp, -20.0, 20.0)
    if kind == "k1":
        kl = -delta
    elif kind == "k2":
        kl = 0.5 * delta**2
    elif kind == "k3":
        kl = jnp.exp(delta) - delta - 1.0
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")
    return jnp.clip(kl, -10.0, 10.0)


def aggregate(values: jax.Array, mask: jax.Array, mode: Aggregation = "token-mean", *,
              num_tokens: jax.Array | float | None = None, num_seqs: jax.Array | float | None = None,
              norm_length: int | jax.Array | None = None, seq_tokens: jax.Array | None = None) -> jax.Array:
    """Reduces per-token values [N, T] to a scalar.

    token-mean: sum(v m) / sum(m) (DAPO). With gradient accumulation pass `num_tokens`, the token count of
      the whole mini-batch, so every micro-batch shares one denominator.
    seq-mean-token-mean: mean over sequences of each sequence's token mean (original GRPO).
    seq-mean-token-sum-norm: sum(v m) / (N * norm_length) (Dr. GRPO); norm_length defaults to T.
    `num_seqs` plays num_tokens' role for the two sequence-level modes.

    seq_tokens [N, T] (packed rows, train/packing.py, where a row holds several sequences): the counted token
    count of each token's own sequence, which replaces the row's mask sum in seq-mean-token-mean; the other
    modes do not depend on how tokens are laid out in rows. Needs `num_seqs` (rows are not sequences).
    """
    mask = mask.astype(jnp.float32)
    values = values.astype(jnp.float32)
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return (values * mask).sum() / jnp.maximum(denom, 1.0)
    seqs = values.shape[0] if num_seqs is None else num_seqs
    if mode == "seq-mean-token-mean" and seq_tokens is not None:
        if num_seqs is None:
            raise ValueError("packed rows (seq_tokens) need num_seqs: a row is not a sequence")
        return (values * mask / jnp.maximum(seq_tokens.astype(jnp.float32), 1.0)).sum() / seqs
    if mode == "seq-mean-token-mean":
        per_seq = (values * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        return per_seq.sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        length = values.shape[-1] if norm_length is None else norm_length
        return (values * mask).sum() / (seqs * length)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float | None = None,
                aggregation: Aggregation = "token-mean", **agg_kwargs) -> tuple[jax.Array, dict]:
    """PPO-clip with decoupled bounds: L = -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A).

    Dual clip (c > 1) bounds the loss of negative-advantage tokens by -c A. Returns (loss, metrics) with
    the fractions of tokens clipped at the low / high bound and by the dual clip. advantages: [N] per
    response, or [N, T] per token (packed rows hold several responses).
    """
    adv = (advantages[:, None] if advantages.ndim == 1 else advantages).astype(jnp.float32)
    log_ratio = jnp.clip(logp - old_logp, -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -ratio * adv
    clipped = -jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = jnp.maximum(unclipped, clipped)
    dual_hit = jnp.zeros_like(loss, dtype=bool)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must exceed 1, got {dual_clip}")
        dual_hit = (adv < 0) & (loss > -dual_clip * adv)
        loss = jnp.where(adv < 0, jnp.minimum(loss, -dual_clip * adv), loss)
    m = mask.astype(jnp.float32)
    count = jnp.maximum(m.sum(), 1.0)
    metrics = {
        "clip_frac_low": (((ratio < 1.0 - eps_low) & (adv < 0)) * m).sum() / count,
        "clip_frac_high": (((ratio > 1.0 + eps_high) & (adv > 0)) * m).sum() / count,
        "clip_frac_dual": (dual_hit * m).sum() / count,
        "approx_kl_old": (0.5 * log_ratio**2 * m).sum() / count,
    }
    return aggregate(loss, mask, aggregation, **agg_kwargs), metrics
