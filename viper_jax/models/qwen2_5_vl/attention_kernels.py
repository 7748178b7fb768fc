"""The decoder's attention by kernel: `xla` (attention.attend, the default), `splash` (Pallas splash attention,
TPU) or `cudnn` (`jax.nn.dot_product_attention(implementation="cudnn")`, GPU); `auto` picks one per platform.

Both kernels attend causally within segments: a row's segment ids are its attention mask (1 = token,
0 = pad), so a token never sees a pad (left or right) and a pad sees only earlier pads. Outputs at real
tokens, and every gradient that reaches them, equal the xla path's; pad rows differ (xla gives a fully
masked row a uniform average over all keys, the kernels one over the pads before it) and are never read.
Kernels serve the forward passes without a cache (training, the log-prob passes) and the rollout's prefill
(cache_index 0: the prompt's own keys are all the cache holds); decode steps always run the xla path.

Splash runs inside `jax.shard_map` over the active mesh (sharding.use_mesh): the batch split over the
"batch" rule's axes (the batch padded to a multiple of them) and the heads over the "kv_heads" rule's axes
where they divide (a Mosaic kernel cannot be partitioned automatically). Sequences are padded to a multiple
of 128 for its blocks. Away from a TPU it runs in Pallas interpret mode (tests only: the config refuses
`splash` there). The cudnn path takes the segments as a [B, 1, T, T] mask (cuDNN wants a full-size bias; its
sequence lengths cannot say left padding).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

ATTENTIONS = ("xla", "splash", "cudnn", "auto")
KERNEL_PLATFORMS = {"splash": "tpu", "cudnn": "gpu"}  # where each kernel runs
AUTO = {"tpu": "splash", "gpu": "cudnn"}  # every other platform: xla
CUDNN_DTYPES = ("bfloat16", "float16")
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the padded length is used


def platform() -> str:
    """The default backend's platform name ("cpu", "gpu", "tpu"); tests monkeypatch it."""
    return jax.default_backend()


def resolve_attention(name: str, platform_name: str | None = None, dtype: Any = None) -> str:
    """`model.attention` -> the implementation that runs ("xla", "splash" or "cudnn") on `platform_name`
    (default: this process's backend). ValueError, naming the key, for an unknown name or a kernel this
    platform (or, for cudnn, the compute dtype) does not have. auto on a GPU picks cudnn only for bf16/fp16
    compute (cuDNN's fused attention has no fp32), xla otherwise."""
    if name not in ATTENTIONS:
        raise ValueError(f"model.attention: {name!r} is not one of {ATTENTIONS}")
    where = platform_name or platform()
    dtype_name = None if dtype is None else jnp.dtype(dtype).name
    if name == "auto":
        chosen = AUTO.get(where, "xla")
        if chosen == "cudnn" and dtype_name is not None and dtype_name not in CUDNN_DTYPES:
            chosen = "xla"
        return chosen
    if name in KERNEL_PLATFORMS and KERNEL_PLATFORMS[name] != where:
        raise ValueError(f"model.attention: {name!r} needs a {KERNEL_PLATFORMS[name].upper()} and this process runs on "
                         f"{where!r}; use 'auto' (picks {AUTO.get(where, 'xla')!r} here) or 'xla'")
    if name == "cudnn" and dtype_name is not None and dtype_name not in CUDNN_DTYPES:
        raise ValueError(f"model.attention: 'cudnn' needs model.dtype in {CUDNN_DTYPES} (got {dtype_name!r}); "
                         f"use 'auto' or 'xla' for {dtype_name}")
    return name


class KernelMask(NamedTuple):
    """Passed down the layers in place of the [B, T, S] mask when a kernel attends: segment ids [B, T]."""

    segment_ids: jax.Array


def kernel_mask(attention_mask: jax.Array | None, batch: int, t: int) -> KernelMask:
    """Segment ids of T tokens from a [B, >= T] padding mask (its first T columns), or all ones."""
    if attention_mask is None:
        return KernelMask(jnp.ones((batch, t), jnp.int32))
    return KernelMask(attention_mask[:, :t].astype(jnp.int32))


def kernel_attend(kind: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: KernelMask, scale: float) -> jax.Array:
    """Causal self-attention of T tokens by `kind` ("splash" | "cudnn"): q [B, T, K, G, d], k/v [B, T, K, d]
    (query head k * G + g uses K/V head k) -> [B, T, K, G, d]."""
    if kind == "splash":
        return splash_attend(q, k, v, mask.segment_ids, scale)
    if kind == "cudnn":
        return cudnn_attend(q, k, v, mask.segment_ids, scale)
    raise ValueError(f"model.attention: no kernel {kind!r}")


# ------------------------------------------------------------------------------------------------ cudnn

def cudnn_attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                 implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` (GQA, [B, T, N, d] layout): causal, with the pads masked as keys.
    (implementation="xla" runs the same call on any platform: the tests' check of this plumbing.)"""
    b, t, kvh, g, d = q.shape
    # Segments as a [B, 1, T, T] mask (cuDNN takes a bias of the full [T, S]; seq-length masks cannot say
    # left padding): query and key in one segment, so a token sees tokens and a pad sees pads.
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    out = jax.nn.dot_product_attention(q.reshape(b, t, kvh * g, d), k, v, mask=same, scale=scale, is_causal=True,
                                       implementation=implementation)
    return out.reshape(b, t, kvh, g, d)


# ------------------------------------------------------------------------------------------------ splash

@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, length: int, interpret: bool) -> Any:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = next(size for size in SPLASH_BLOCKS if length % size == 0)
    blocks = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                           block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret)


def _entry_axes(mesh: Any, entry: Any, taken: tuple[str, ...] = ()) -> tuple[tuple[str, ...], int]:
    """(the mesh axes of a logical rule's entry, not in `taken`; how many shards they make together)."""
    axes = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a not in taken)
    return axes, int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _mesh_axes(mesh: Any, entry: Any, size: int, taken: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The mesh axes of a logical rule's entry that split a dimension of `size` (None: not split)."""
    axes, total = _entry_axes(mesh, entry, taken)
    if total == 1 or size % total:
        return None
    return axes


def splash_attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                  interpret: bool | None = None) -> jax.Array:
    """Splash attention (causal, segment ids [B, T]); q [B, T, K, G, d], k/v [B, T, K, d] -> [B, T, K, G, d].
    interpret=None: interpret mode unless the active mesh's devices (else this process's backend) are TPUs,
    so an ahead-of-time compile for an absent TPU topology (`viper plan`) gets the Mosaic kernel."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    from ...sharding import _ACTIVE, logical_to_spec

    if interpret is None:
        interpret = (_ACTIVE[-1][0].devices.flat[0].platform if _ACTIVE else platform()) != "tpu"
    b, t, kvh, g, d = q.shape
    length = -(-t // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kvh * g, d).transpose(0, 2, 1, 3)  # [B, H, T, d]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, d]
    seg = segment_ids.astype(jnp.int32)
    if length != t:  # extra positions: segment -1, seen by no token
        pad = ((0, 0), (0, 0), (0, length - t), (0, 0))
        qh, kh, vh = jnp.pad(qh, pad), jnp.pad(kh, pad), jnp.pad(vh, pad)
        seg = jnp.pad(seg, ((0, 0), (0, length - t)), constant_values=-1)

    def local(qh, kh, vh, seg):
        kernel = _splash_kernel(qh.shape[1], length, interpret)
        return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(q=s1, kv=s1)))(qh, kh, vh, seg)

    if _ACTIVE:
        mesh, rules = _ACTIVE[-1]
        entry = logical_to_spec(("batch",), rules)[0]
        # A batch the batch axes do not divide (e.g. 20 rows over 16 chips) is padded up to a multiple with
        # rows of segment -1, so it still splits: unsplit, every chip ran the kernel on every row (docs/plan.md).
        extra = -b % _entry_axes(mesh, entry)[1]
        if extra:
            qh, kh, vh = (jnp.pad(x, ((0, extra), (0, 0), (0, 0), (0, 0))) for x in (qh, kh, vh))
            seg = jnp.pad(seg, ((0, extra), (0, 0)), constant_values=-1)
        batch_axes = _mesh_axes(mesh, entry, b + extra)
        head_axes = _mesh_axes(mesh, logical_to_spec(("kv_heads",), rules)[0], kvh, batch_axes or ())
        qkv = P(batch_axes, head_axes, None, None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch_axes, None)), out_specs=qkv,
                            check_vma=False)(qh, kh, vh, seg)[:b]
    else:
        out = local(qh, kh, vh, seg)
    return out[:, :, :t].transpose(0, 2, 1, 3).reshape(b, t, kvh, g, d)
