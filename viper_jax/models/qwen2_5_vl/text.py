"""Qwen2.5-VL language model (transformers' `Qwen2_5_VLTextModel`): a Qwen2 decoder with MRoPE.

KV cache (for the rollout engine). A cache is a dict `{"k": [L, B, KV, S, hd], "v": [L, B, KV, S, hd]}`
(`init_cache`): heads before slots, so attention reads it without a transpose. The layer scan carries
the whole cache and each layer writes its T new keys/values in place at slots
`[cache_index, cache_index + T)` (a `dynamic_update_slice` on the carry, which XLA does in place,
instead of scanning over per-layer slices, which copies the cache every step; `cache_index` is a scalar
shared by the batch, i.e. prompts are left-padded to a common length), attends over all S slots, and the
call returns the updated cache. The mask is then built from `attention_mask` [B, S] (1 = a filled, non-pad slot,
including the T new ones) and causality on absolute slot positions (slot s is visible to query t when
s <= cache_index + t). Without a cache, `attention_mask` is the usual [B, T] padding mask. Logical
names for sharding a cache: ("layers", "cache_batch", "cache_heads", "cache_length", None).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ...sharding import constrain
from .config import TextConfig
from .attention import attend
from .attention_kernels import KernelMask, kernel_attend, kernel_mask, resolve_attention
from .layers import GatedMLP, Linear, RMSNorm, param, rotate_half, scan_layers, stacked

Cache = dict[str, jax.Array]
HIDDEN = ("batch", "length", "embed")  # logical names of [B, T, D] activations (no-op without a mesh)


# A cache array is [layers, batch, kv heads, slots, head_dim]; these are its logical axis names.
CACHE_AXES = ("layers", "cache_batch", "cache_heads", "cache_length", None)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, std: float, param_dtype: Any, rngs: nnx.Rngs):
        self.embedding = param(std * jax.random.normal(rngs.params(), (vocab, dim), param_dtype), ("vocab", "embed"))


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: Any, param_dtype: Any, query_chunk: int = 0,
                 attention: str = "xla", rngs: nnx.Rngs):
        d, hd, h, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        kw = dict(std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, h * hd, ("embed", "heads"), bias=True, **kw)
        self.k_proj = Linear(d, kv * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = Linear(d, kv * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = Linear(h * hd, d, ("heads", "embed"), bias=False, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.query_chunk = query_chunk  # see attention.attend; decode steps (T = 1) never chunk
        self.attention = attention  # "xla" | "splash" | "cudnn": see attention_kernels (used with a KernelMask)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: Cache | None = None, cache_index: jax.Array | int = 0,
                 layer: jax.Array | int | None = 0) -> tuple[jax.Array, Cache | None]:
        """With a cache, writes the new keys/values and attends over all slots: the stacked cache of all
        layers at index `layer`, or (layer=None) this layer's own [B, KV, S, hd] cache."""
        b, t, _ = x.shape
        hd, kvh = self.head_dim, self.num_kv_heads
        q = self.q_proj(x).reshape(b, t, self.num_heads, hd)
        k = self.k_proj(x).reshape(b, t, kvh, hd)
        v = self.v_proj(x).reshape(b, t, kvh, hd)
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        q = q.reshape(b, t, kvh, self.num_heads // kvh, hd)
        kernel = isinstance(mask, KernelMask)  # the T tokens attend among themselves (no cache, or a prefill)
        if kernel:
            out = kernel_attend(self.attention, q, k, v, mask, hd**-0.5)
        if cache is None:
            if not kernel:
                out = attend(q, k, v, mask, hd**-0.5, query_chunk=self.query_chunk)
        elif layer is None:  # this layer's own cache [B, KV, S, hd] (the unrolled decode)
            cache = {name: jax.lax.dynamic_update_slice(
                cache[name], new.transpose(0, 2, 1, 3).astype(cache[name].dtype), (0, 0, cache_index, 0))
                for name, new in (("k", k), ("v", v))}
            out = attend(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), mask, hd**-0.5, heads_first=True)
        else:
            start = (layer, 0, 0, cache_index, 0)
            cache = {name: jax.lax.dynamic_update_slice(
                cache[name], new.transpose(0, 2, 1, 3)[None].astype(cache[name].dtype), start)
                for name, new in (("k", k), ("v", v))}
            if not kernel:
                k_all, v_all = (jax.lax.dynamic_index_in_dim(cache[n], layer, keepdims=False) for n in ("k", "v"))
                out = attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, hd**-0.5, heads_first=True,
                             query_chunk=self.query_chunk)
        return self.o_proj(out.reshape(b, t, -1)), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: Any, param_dtype: Any, query_chunk: int = 0,
                 attention: str = "xla", rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = TextAttention(cfg, dtype=dtype, param_dtype=param_dtype, query_chunk=query_chunk,
                                       attention=attention, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False,
                            std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: Cache | None = None,
                 cache_index: jax.Array | int = 0, layer: jax.Array | int | None = 0) -> tuple[jax.Array, Cache | None]:
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index, layer)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: str = "none", scan: bool = True, query_chunk: int = 0, attention: str = "xla",
                 rngs: nnx.Rngs):
        if attention == "auto":
            attention = resolve_attention(attention, dtype=dtype)
        if attention not in ("xla", "splash", "cudnn"):
            raise ValueError(f"attention: {attention!r} is not one of 'xla', 'splash', 'cudnn', 'auto'")
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range, param_dtype, rngs)
        self.layers = stacked(cfg.num_hidden_layers, lambda r: DecoderLayer(
            cfg, dtype=dtype, param_dtype=param_dtype, query_chunk=query_chunk, attention=attention, rngs=r),
            rngs, stack=scan)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        self.attention = attention  # the kernel of forward passes and prefills; decode steps always run xla

    def embed(self, input_ids: jax.Array) -> jax.Array:
        # The lookup gathers whole rows: unshard the embed axis first (as FSDP does for any weight), so
        # the result can take the batch layout without an all-to-all XLA cannot express for a gather.
        table = constrain(self.embed_tokens.embedding[...], ("vocab", None))
        return jnp.take(table, input_ids, axis=0).astype(self.dtype)

    def rope(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """MRoPE tables [B, T, head_dim]: computed in fp32, cast to the compute dtype as HF does.

        Frequency chunk i of `mrope_section` takes its angle from axis i % 3 (t, h, w) of position_ids [3, B, T].
        """
        dim = self.cfg.head_dim
        inv = 1.0 / (self.cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        freqs = position_ids.astype(jnp.float32)[..., None] * inv  # [3, B, T, dim/2]
        chunks, start = [], 0
        for i, size in enumerate(self.cfg.mrope_section):
            chunks.append(freqs[i % 3, ..., start:start + size])
            start += size
        emb = jnp.concatenate(chunks * 2, axis=-1)
        return jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype)

    # Logical axis names of init_cache's arrays, in its order (the sharding rules map them to mesh axes).
    cache_axes = CACHE_AXES

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
        shape = (self.cfg.num_hidden_layers, batch, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype or self.dtype), "v": jnp.zeros(shape, dtype or self.dtype)}

    def layer_list(self) -> list[DecoderLayer]:
        """The layers as L modules: unstacked ones as they are, stacked ones each holding its slice of the
        parameters (sliced once, here).

        The decode loop runs these unrolled, over one cache per layer: in a scan every step would
        dynamic-slice (copy) each layer's weights and cache out of the stacks, which took a third of a
        CPU decode step; unrolled, both are read in place."""
        if isinstance(self.layers, nnx.List):
            return list(self.layers)
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                for i in range(self.cfg.num_hidden_layers)]

    def decode(self, layers: list[DecoderLayer], inputs_embeds: jax.Array, position_ids: jax.Array,
               attention_mask: jax.Array, caches: list[Cache], cache_index: jax.Array | int
               ) -> tuple[jax.Array, list[Cache]]:
        """`__call__` with a cache, unrolled over `layer_list()` with per-layer caches {"k", "v": [B, KV, S, hd]}."""
        mask = _mask(inputs_embeds.shape[1], attention_mask, caches[0]["k"].shape[2], cache_index)
        cos, sin = self.rope(position_ids)
        x = constrain(inputs_embeds.astype(self.dtype), HIDDEN)
        new_caches = []
        for layer, cache in zip(layers, caches, strict=True):
            x, cache = layer(x, cos, sin, mask, cache, cache_index, None)
            x = constrain(x, HIDDEN)
            new_caches.append(cache)
        return constrain(self.norm(x), HIDDEN), new_caches

    def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, attention_mask: jax.Array | None = None,
                 cache: Cache | None = None, cache_index: jax.Array | int = 0,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """inputs_embeds [B, T, D], position_ids [3, B, T] -> (final-normed hidden [B, T, D], cache).

        segment_ids [B, T] (packed rows, no cache; replaces attention_mask): a token attends causally to the
        earlier tokens of its own segment only (0 = padding, which real segments never see)."""
        b, t = inputs_embeds.shape[:2]
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids are for packed rows without a KV cache")
            # The kernels take segment ids as they are; xla gets the [B, T, T] mask they stand for.
            mask = KernelMask(segment_ids.astype(jnp.int32)) if self.attention != "xla" else \
                _mask(t, None, None, 0) & (segment_ids[:, :, None] == segment_ids[:, None, :])
        # A kernel attends without a cache, or in a prefill (cache_index 0: the T tokens are all the cache holds).
        elif self.attention != "xla" and t > 1 and (cache is None
                                                     or (isinstance(cache_index, int) and cache_index == 0)):
            mask = kernel_mask(attention_mask, b, t)
        else:
            mask = _mask(t, attention_mask, None if cache is None else cache["k"].shape[3], cache_index)
        cos, sin = self.rope(position_ids)

        x = constrain(inputs_embeds.astype(self.dtype), HIDDEN)
        if cache is None:
            def body(layer, x, _):
                x, _ = layer(x, cos, sin, mask)
                return constrain(x, HIDDEN), None  # the scan carry: one layout between all layers

            x, _ = scan_layers(self.layers, body, x, None, self.remat)
        else:
            def body(layer, carry, index):  # the cache rides in the carry, updated in place
                x, cache = carry
                x, cache = layer(x, cos, sin, mask, cache, cache_index, index)
                return (constrain(x, HIDDEN), cache), None

            (x, cache), _ = scan_layers(self.layers, body, (x, cache), jnp.arange(self.cfg.num_hidden_layers),
                                        self.remat)
        return constrain(self.norm(x), HIDDEN), cache


def _mask(t: int, attention_mask: jax.Array | None, slots: int | None, cache_index: jax.Array | int) -> jax.Array:
    """[B or 1, T, S] (True = attend): causal over T tokens, or over `slots` cache slots (slot s is visible
    to query t when s <= cache_index + t), and the padding mask."""
    if slots is None:
        keys = jnp.arange(t)
        mask = (keys[None, :] <= keys[:, None])[None]
    else:
        mask = (jnp.arange(slots)[None, :] <= cache_index + jnp.arange(t)[:, None])[None]
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    return mask
