"""Rollout engine: multimodal prefill + KV-cache decode inside one jitted program.

Flow for B prompts and G samples each:
  1. host: pad the prompts (left) to a length bucket; positions from get_rope_index; vision index arrays.
  2. jit: vision tower once per prompt, prefill the B prompts into a cache of `bucket + max_new_tokens`
     slots, then repeat the cache G times (the group shares one prefill).
  3. jit: `lax.while_loop` decode: one token per row per step at position max(prompt positions) + 1 + i
     on all three MRoPE axes (HF's rope_deltas), stopping when every row hit an end token or the limit;
     with `shrink_rows`, ended rows leave the batch as it halves (same tokens, fewer wasted slots).
Prompt buckets and max_new_tokens are static, so XLA compiles once per (bucket, image-grid set).
The model's own parameters are used in place: no copy, no second model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viper_jax.data.processing import bucket_for
from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, VisionInputs, prepare_vision
from viper_jax.models.qwen2_5_vl.rope_index import next_positions, prompt_positions
from viper_jax.rollout.sampling import SamplingConfig, sample


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int = 128
    prompt_buckets: tuple[int, ...] = (128, 256, 512, 1024)
    max_cache_len: int = 4096  # prompt bucket + max_new_tokens must fit
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    group_size: int = 1
    sampling: SamplingConfig = SamplingConfig()
    cache_dtype: Any = None  # default: the model's compute dtype
    # 0: every row stays in the decode batch until the longest ends. k > 0: the batch halves (to multiples
    # of k) whenever at most half its rows are still live; same tokens, fewer wasted slots (see `decode`).
    shrink_rows: int = 0


@dataclasses.dataclass
class RolloutResult:
    tokens: np.ndarray      # [B*G, max_new_tokens] int32, pad after the end token
    lengths: np.ndarray     # [B*G] tokens generated, the end token included
    logprobs: np.ndarray    # [B*G, max_new_tokens] float32 under logits / temperature, 0 after the end
    prompt_index: np.ndarray  # [B*G] which prompt each row answers (rows of a group are consecutive)
    seconds: float
    kv_cache_bytes: int
    decode_slots: int = 0   # rows x decode steps the loop ran (every process's rows when split)

    @property
    def tokens_per_second(self) -> float:
        return float(self.lengths.sum()) / max(self.seconds, 1e-9)

    @property
    def useful_slot_share(self) -> float:
        """`useful_slot_share` of this result. Split over processes, lengths are this host's rows only and the
        slots the whole batch's: there use the gathered lengths (as the trainer does)."""
        return useful_slot_share(self.lengths, self.decode_slots)


def check_fits(model: Qwen2_5_VL, bucket: int, cfg: RolloutConfig) -> None:
    """A prompt bucket plus max_new_tokens must fit the KV cache and the model's positions."""
    if bucket + cfg.max_new_tokens > cfg.max_cache_len:
        raise ValueError(f"prompt bucket {bucket} + max_new_tokens {cfg.max_new_tokens} exceeds the KV cache "
                         f"({cfg.max_cache_len} slots); lower max_new_tokens or raise rollout.max_cache_len")
    if bucket + cfg.max_new_tokens > model.config.text.max_position_embeddings:
        raise ValueError(f"prompt bucket {bucket} + max_new_tokens {cfg.max_new_tokens} exceeds the model's "
                         f"max_position_embeddings {model.config.text.max_position_embeddings}")


def kv_cache_bytes(model: Qwen2_5_VL, rows: int, length: int, dtype: Any) -> int:
    t = model.config.text
    return 2 * t.num_hidden_layers * rows * length * t.num_key_value_heads * t.head_dim * jnp.dtype(dtype).itemsize


def left_pad(ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts [B, T] and their mask, padded on the left to `length` columns."""
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return (np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (extra, 0))))


@nnx.jit(static_argnames=("cfg",))
def prefill(model: Qwen2_5_VL, ids, mask, positions, pixel_values, vision_inputs: VisionInputs | None,
            cfg: RolloutConfig):
    """(last-position logits [B, V] fp32, the stacked cache of `bucket + max_new_tokens` slots) of B prompts."""
    b, t = ids.shape
    embeds = model.embed(ids, pixel_values, vision_inputs)
    slots = t + cfg.max_new_tokens
    cache = model.init_cache(b, slots, cfg.cache_dtype)
    slot_mask = jnp.concatenate([mask, jnp.zeros((b, cfg.max_new_tokens), mask.dtype)], axis=1)
    hidden, cache = model.language_model(embeds, positions, slot_mask, cache, 0)
    # lm_head on the last position only: the other T - 1 rows of logits would be discarded.
    return model.logits_from_hidden(hidden[:, -1]).astype(jnp.float32), cache


def sample_next(model: Qwen2_5_VL, layers: list, token: jax.Array, positions: jax.Array, slot_mask: jax.Array,
                caches: list, slot: jax.Array | int, key: jax.Array, sampling: SamplingConfig,
                rows: jax.Array | None = None, total_rows: int = 0) -> tuple[jax.Array, jax.Array, list]:
    """One decode step: `token` [R] written at cache `slot` (positions [3, R, 1]), the next token sampled.
    Returns (token [R], its log-prob [R], the per-layer caches). `viper plan` compiles exactly this.
    rows / total_rows: the R rows are these of a batch of total_rows (a shrunk decode loop; see `decode`)."""
    embeds = model.language_model.embed(token[:, None])
    logits, caches = model.decode_with_layer_caches(layers, embeds, positions, slot_mask, caches, slot)
    tok, lp = sample(logits[:, -1], key, sampling, rows=rows, total_rows=total_rows)
    return tok, lp, caches


def shrink_sizes(rows: int, shrink_rows: int) -> tuple[int, ...]:
    """The decode loop's batch sizes, one per phase: `rows`, then halved while the half is a multiple of
    `shrink_rows` (0: never). A multiple, so that a mesh of `shrink_rows` batch shards still divides it."""
    sizes = [rows]
    while shrink_rows > 0 and sizes[-1] % 2 == 0 and (sizes[-1] // 2) % shrink_rows == 0:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def auto_shrink_rows(rows: int, batch_shards: int = 1) -> int:
    """A `shrink_rows` for `rows` decode rows split `batch_shards` ways: at most four batch sizes (rows down to
    rows / 8), since each size is one more decode body to compile. On geometric lengths of mean max/4 that
    leaves ~70% of the slots useful (24-29% whole, ~75% halving down to one row at log2(rows) + 1 bodies)."""
    return batch_shards * max(1, rows // (8 * batch_shards))


def useful_slot_share(lengths: Any, decode_slots: int) -> float:
    """Real response tokens / the decode slots the loop ran (rows x steps, summed over its phases): the share
    of sampled positions that belong to a response rather than to a row that had already ended."""
    return float(np.asarray(lengths).sum()) / max(int(decode_slots), 1)


@nnx.jit(static_argnames=("cfg", "prompt_len"))
def decode(model: Qwen2_5_VL, last_logits, cache, mask, next_pos, rng, cfg: RolloutConfig, prompt_len: int):
    """(tokens, log-probs [B*G, max_new_tokens], lengths [B*G], decode slots []): G samples per prompt from
    the prefill's cache, in `lax.while_loop`s that stop when every row has hit an end token or the limit.

    With cfg.shrink_rows, once at most half of the loop's rows are still live, the live ones move (with their
    caches) into a batch of half the size and the loop goes on there: rows that ended stop costing compute and
    cache reads. Each row keeps its own random draw (sampling.draw's `rows`), so the tokens are those of the
    unshrunk loop. Decode slots: rows x steps actually run, the first token's included."""
    g = cfg.group_size
    # The group shares one prefill: repeat every per-row tensor G times (rows of a group consecutive).
    last_logits = jnp.repeat(last_logits, g, axis=0)
    # One cache per layer and the layers unrolled (TextModel.layer_list): each step then reads every
    # layer's weights and cache in place instead of slicing them out of the stacks.
    layers = model.language_model.layer_list()
    caches = [{name: jnp.repeat(cache[name][i], g, axis=0) for name in ("k", "v")} for i in range(len(layers))]
    mask = jnp.repeat(mask, g, axis=0)
    next_pos = jnp.repeat(next_pos, g, axis=0)
    rows, n = last_logits.shape[0], cfg.max_new_tokens
    slot_mask = jnp.concatenate([mask, jnp.zeros((rows, n), mask.dtype)], axis=1)
    eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)

    rng, key = jax.random.split(rng)
    tok, lp = sample(last_logits, key, cfg.sampling)
    tokens = jnp.full((rows, n), cfg.pad_token_id, jnp.int32).at[:, 0].set(tok)
    logprobs = jnp.zeros((rows, n), jnp.float32).at[:, 0].set(lp)
    done = jnp.isin(tok, eos)
    lengths = jnp.ones((rows,), jnp.int32)

    def phase(state, ids, limit: int):
        """Steps on the loop's current rows (`ids`: which output rows they are; None: all, in order) while
        more than `limit` of them are live."""
        size = rows if ids is None else ids.shape[0]

        def cond(state):
            i, _, _, _, _, done, _, _, _ = state
            return (i < n) & (jnp.sum(~done) > limit)

        def body(state):
            i, caches, slot_mask, tokens, logprobs, done, lengths, rng, slots = state
            token = tokens[:, i - 1] if ids is None else tokens[ids, i - 1]
            slot = prompt_len + i - 1
            slot_mask = jax.lax.dynamic_update_slice(slot_mask, jnp.ones((size, 1), slot_mask.dtype), (0, slot))
            pos = jnp.broadcast_to((next_pos_k + i - 1)[None, :, None], (3, size, 1))
            rng, key = jax.random.split(rng)
            tok, lp, caches = sample_next(model, layers, token, pos, slot_mask, caches, slot, key, cfg.sampling,
                                          rows=ids, total_rows=rows)
            tok = jnp.where(done, cfg.pad_token_id, tok)
            lp = jnp.where(done, 0.0, lp)
            if ids is None:  # the unshrunk loop writes a column in place
                tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
                logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], (0, i))
                lengths = lengths + (~done).astype(jnp.int32)
            else:  # ids are distinct, so the scatters never collide
                tokens = tokens.at[ids, i].set(tok)
                logprobs = logprobs.at[ids, i].set(lp)
                lengths = lengths.at[ids].add((~done).astype(jnp.int32))
            done = done | jnp.isin(tok, eos)
            return i + 1, caches, slot_mask, tokens, logprobs, done, lengths, rng, slots + size

        next_pos_k = next_pos if ids is None else next_pos[ids]
        return jax.lax.while_loop(cond, body, state)

    sizes = shrink_sizes(rows, cfg.shrink_rows)
    state = (jnp.int32(1), caches, slot_mask, tokens, logprobs, done, lengths, rng, jnp.int32(rows))
    ids = None
    for k, size in enumerate(sizes):
        if k:
            # The previous phase left at most `size` live rows; a stable sort puts them first (then ended
            # ones as filler, which only write pads), so every live row moves along with its cache.
            i, caches, slot_mask, tokens, logprobs, done, lengths, rng, slots = state
            keep = jnp.argsort(done.astype(jnp.int32), stable=True)[:size]
            caches = [{name: c[name][keep] for name in ("k", "v")} for c in caches]
            ids = keep if ids is None else ids[keep]
            state = (i, caches, slot_mask[keep], tokens, logprobs, done[keep], lengths, rng, slots)
        state = phase(state, ids, sizes[k + 1] if k + 1 < len(sizes) else 0)
    _, _, _, tokens, logprobs, _, lengths, _, slots = state
    return tokens, logprobs, lengths, slots


def generate(model: Qwen2_5_VL, input_ids: Any, attention_mask: Any, rng: jax.Array, cfg: RolloutConfig,
             pixel_values: Any = None, image_grid_thw: Any = None) -> RolloutResult:
    """Samples `cfg.group_size` responses for each of the B prompts (left-padded [B, T] on the host)."""
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    bucket = bucket_for(ids.shape[1], cfg.prompt_buckets, grow=False)
    check_fits(model, bucket, cfg)
    ids, mask = left_pad(ids, mask, bucket, cfg.pad_token_id)
    positions = prompt_positions(ids, mask, image_grid_thw, model.config)
    vision_inputs = None if image_grid_thw is None else prepare_vision(np.asarray(image_grid_thw), model.config.vision)
    next_pos = next_positions(positions)  # generated token i sits at next_pos + i on every axis
    cache_dtype = cfg.cache_dtype or model.dtype
    cfg = dataclasses.replace(cfg, cache_dtype=cache_dtype)
    start = time.perf_counter()
    last_logits, cache = prefill(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions),
                                  None if pixel_values is None else jnp.asarray(pixel_values), vision_inputs, cfg)
    tokens, logprobs, lengths, slots = decode(model, last_logits, cache, jnp.asarray(mask), jnp.asarray(next_pos),
                                              rng, cfg, bucket)
    tokens, logprobs, lengths, slots = jax.device_get((tokens, logprobs, lengths, slots))
    seconds = time.perf_counter() - start
    rows = ids.shape[0] * cfg.group_size
    return RolloutResult(tokens=np.asarray(tokens), lengths=np.asarray(lengths), logprobs=np.asarray(logprobs),
                         prompt_index=np.repeat(np.arange(ids.shape[0]), cfg.group_size), seconds=seconds,
                         kv_cache_bytes=kv_cache_bytes(model, rows, bucket + cfg.max_new_tokens, cache_dtype),
                         decode_slots=int(slots))
