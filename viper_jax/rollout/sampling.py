"""Next-token sampling: greedy, temperature, top-k, top-p, all inside jit with static settings.

The returned log-probability is that of the chosen token under `log_softmax(logits / temperature)`
over the full vocabulary (top-k/top-p only restrict which tokens can be drawn). This is what GRPO
recomputes in its forward pass over prompt + response (verl, EasyR1 and TRL all use logits / T), so
the rollout's log-probs can serve as the old policy without a second pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static (hashable) sampling settings. temperature == 0 or greedy=True means argmax."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def _mask_top_k(logits: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _mask_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability reaches p (the nucleus)."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token stays if the mass strictly before it is below p; the top token always stays.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def filtered_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature-scaled logits with top-k / top-p applied (what the sampler draws from)."""
    scaled = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        scaled = _mask_top_k(scaled, min(cfg.top_k, scaled.shape[-1]))
    if cfg.top_p < 1.0:
        scaled = _mask_top_p(scaled, cfg.top_p)
    return scaled


def draw(logits: jax.Array, rng: jax.Array, block: int = 128, rows: jax.Array | None = None,
         total_rows: int = 0) -> jax.Array:
    """One token per row from softmax(logits) [B, V] by inverting the CDF with one uniform per row.

    `jax.random.categorical` (Gumbel-max) draws V random numbers and two logs per row, which on CPU cost
    ~15x this. Two levels (blocks of `block` tokens, then tokens inside the chosen block) keep the
    cumulative sums short. A token is drawn iff cdf[j-1] <= u < cdf[j], so a zero-probability (masked)
    token is never drawn; the clamps guard against u landing past the last positive entry by rounding.

    rows / total_rows: the logits are rows `rows` of a batch of `total_rows` (the decode loop's shrunk
    batch); each row then gets the uniform the whole batch would have given it, so it draws the same token.
    """
    b, v = logits.shape
    nb = -(-v // block)
    w = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    w = jnp.pad(w, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
    blocks = w.sum(-1)
    cdf_blocks = jnp.cumsum(blocks, axis=-1)
    if rows is None:
        u = jax.random.uniform(rng, (b, 1), jnp.float32)
    else:
        u = jax.random.uniform(rng, (total_rows, 1), jnp.float32)[rows]
    u = u * cdf_blocks[:, -1:]
    last_block = jnp.max(jnp.where(blocks > 0, jnp.arange(nb), 0), axis=-1)
    bi = jnp.minimum(jnp.sum(cdf_blocks <= u, axis=-1), last_block)
    before = jnp.take_along_axis(cdf_blocks - blocks, bi[:, None], axis=-1)
    inner = jnp.take_along_axis(w, bi[:, None, None], axis=1)[:, 0]
    last_inner = jnp.max(jnp.where(inner > 0, jnp.arange(block), 0), axis=-1)
    ii = jnp.minimum(jnp.sum(jnp.cumsum(inner, axis=-1) <= u - before, axis=-1), last_inner)
    return bi * block + ii


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig, rows: jax.Array | None = None,
           total_rows: int = 0) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] -> (tokens [B] int32, logprobs [B] float32 under logits / temperature).
    rows / total_rows: see `draw` (B of the batch's total_rows rows, by index)."""
    logits = logits.astype(jnp.float32)
    # Greedy log-probs are reported at temperature 1 when no temperature is set (T == 0).
    full = jax.nn.log_softmax(logits / (cfg.temperature or 1.0), axis=-1)
    if cfg.is_greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        tokens = draw(filtered_logits(logits, cfg), rng, rows=rows, total_rows=total_rows)
    return tokens.astype(jnp.int32), jnp.take_along_axis(full, tokens[:, None], axis=-1)[:, 0]
