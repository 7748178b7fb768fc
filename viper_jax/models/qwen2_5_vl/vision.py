"""Qwen2.5-VL vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`).

Attention never builds an N x N mask over all patches. HF attends block-diagonally: over windows
(`cu_window_seqlens`, at most (window_size / patch_size)^2 = 64 patches) in most blocks, and over
whole frames (`cu_seqlens`) in `fullatt_block_indexes`. Here the tokens of each block-diagonal
segment are gathered into a padded [num_segments, max_len] layout with a key-validity mask,
attended per segment, and gathered back. Every index array comes from `prepare_vision`, which runs
on the host in NumPy from `grid_thw`, so the jitted tower sees static shapes only.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...sharding import constrain
from .config import VisionConfig
from .attention import attend
from .layers import GatedMLP, Linear, RMSNorm, param, rotate_half, scan_layers, stacked


@partial(jax.tree_util.register_dataclass,
         data_fields=["patch_perm", "merge_unperm", "pos_hw", "win_gather", "win_valid", "win_slot",
                      "full_gather", "full_valid", "full_slot"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """Host-computed index arrays for one set of `grid_thw` (N patches, N/4 merged tokens)."""

    patch_perm: Any    # [N] int32: row i of the window-ordered sequence is input patch patch_perm[i]
    merge_unperm: Any  # [N/4] int32: argsort(window_index), restores the processor's token order
    pos_hw: Any        # [N, 2] int32: (row, col) of each patch, already in window order
    win_gather: Any    # [Sw, Lw] int32: window segments (indices into the window-ordered sequence)
    win_valid: Any     # [Sw, Lw] bool: real (True) or padding slot
    win_slot: Any      # [N] int32: flat slot (s * Lw + j) holding each token, to gather results back
    full_gather: Any   # [Sf, Lf] int32: one segment per frame
    full_valid: Any    # [Sf, Lf] bool
    full_slot: Any     # [N] int32


# Patch/merged tokens are one flat [N, D] sequence over all images (no batch axis): split them like a batch.
TOKENS = ("vision_tokens", "embed")


def _window_index(grid_thw: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """NumPy copy of transformers.vision_utils.get_vision_window_index (same padding with -100)."""
    ws = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    unit = cfg.spatial_merge_size**2
    index_all, cu, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // cfg.spatial_merge_size, w // cfg.spatial_merge_size
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = ws - gh % ws, ws - gw % ws  # a whole empty window when divisible, as in HF
        nh, nw = (gh + pad_h) // ws, (gw + pad_w) // ws
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws, ws)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index_all.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * gh * gw
    cu_arr = np.asarray(cu, np.int64)
    cu_arr = cu_arr[np.concatenate([[True], np.diff(cu_arr) != 0])]  # torch.unique_consecutive
    return np.concatenate(index_all), cu_arr


def _segments(cu: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded gather indices, validity and per-token slot for contiguous segments [cu[i], cu[i+1])."""
    starts, lens = cu[:-1], np.diff(cu)
    width = int(lens.max())
    offs = np.arange(width)
    valid = offs[None, :] < lens[:, None]
    gather = np.where(valid, starts[:, None] + offs[None, :], 0)
    seg_of = np.repeat(np.arange(len(lens)), lens)
    slot = seg_of * width + (np.arange(n) - starts[seg_of])
    return gather.astype(np.int32), valid, slot.astype(np.int32)


def prepare_vision(grid_thw: Any, config: VisionConfig) -> VisionInputs:
    """All index arrays the vision tower needs, from `grid_thw` [num_images, 3] (host, NumPy)."""
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = config.spatial_merge_size
    if (grid[:, 1:] % m).any():
        raise ValueError(f"grid h and w must be multiples of spatial_merge_size {m}, got {grid.tolist()}")
    n = int(np.prod(grid, axis=1).sum())
    # (row, col) per patch in merge-block-major order, repeated per frame (get_vision_position_ids).
    pos = []
    for t, h, w in grid.tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blk = (h // m, m, w // m, m)
        hw = np.stack([hh.reshape(blk).transpose(0, 2, 1, 3).ravel(), ww.reshape(blk).transpose(0, 2, 1, 3).ravel()], -1)
        pos.append(np.tile(hw, (t, 1)))
    window_index, cu_window = _window_index(grid, config)
    unit = m * m
    patch_perm = (window_index[:, None] * unit + np.arange(unit)).reshape(-1)
    cu_full = np.concatenate([[0], np.cumsum(np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))])
    wg, wv, wslot = _segments(cu_window, n)
    fg, fv, fslot = _segments(cu_full, n)
    return VisionInputs(patch_perm=patch_perm.astype(np.int32), merge_unperm=np.argsort(window_index).astype(np.int32),
                        pos_hw=np.concatenate(pos)[patch_perm].astype(np.int32), win_gather=wg, win_valid=wv,
                        win_slot=wslot, full_gather=fg, full_valid=fv, full_slot=fslot)


# The gathered [S, L, H, d] segments: split over segments like the token sequence and over heads like the
# qkv kernel. Without these, a gather's output carries no sharding and XLA replicates it: every chip then
# scores every image (a 1280-token image's full-attention segment is [16, 5120, 5120] fp32, 1.7 GB).
SEGMENTS = ("vision_tokens", None, "heads", None)
HEADS = ("vision_tokens", "heads", None)


def _segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, gather: jax.Array, valid: jax.Array,
                       slot: jax.Array, scale: float) -> jax.Array:
    """q/k/v [N, H, d] -> per-segment attention over the padded [S, L] layout -> [N, H, d]."""
    n, h, d = q.shape
    q, k, v = (constrain(x[gather], SEGMENTS) for x in (q, k, v))
    out = attend(q[:, :, :, None], k, v, valid[:, None, :], scale)  # [S, L, H, 1, d]
    out = constrain(out.reshape(out.shape[0], -1, h, d), SEGMENTS)
    return constrain(out.reshape(-1, h, d)[slot], HEADS)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, std = cfg.hidden_size, cfg.initializer_range
        kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Fused qkv stored [D, 3, D] so the output axis can carry the 'heads' name.
        self.qkv = Linear(d, (3, d), ("embed", None, "heads"), bias=True, **kw)
        self.proj = Linear(d, d, ("heads", "embed"), bias=True, **kw)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, is_full: jax.Array | bool,
                 vi: VisionInputs) -> jax.Array:
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # HF applies the vision rotary in fp32 (apply_rotary_pos_emb_vision) and casts back.
        c, s = cos[:, None, :], sin[:, None, :]
        qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
        q = (qf * c + rotate_half(qf) * s).astype(x.dtype)
        k = (kf * c + rotate_half(kf) * s).astype(x.dtype)
        scale = self.head_dim**-0.5
        window = partial(_segment_attention, gather=vi.win_gather, valid=vi.win_valid, slot=vi.win_slot, scale=scale)
        full = partial(_segment_attention, gather=vi.full_gather, valid=vi.full_valid, slot=vi.full_slot, scale=scale)
        if isinstance(is_full, (bool, np.bool_)):  # unrolled blocks: the block's kind is known when tracing
            out = (full if is_full else window)(q, k, v)
        else:
            out = jax.lax.cond(is_full, full, window, q, k, v)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype)  # eps hard-coded in HF
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True,
                            std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, is_full: jax.Array | bool,
                 vi: VisionInputs) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, is_full, vi)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        wide = cfg.hidden_size * cfg.spatial_merge_size**2
        kw = dict(bias=True, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype)
        self.mlp_0 = Linear(wide, wide, ("embed", "mlp"), **kw)
        self.mlp_2 = Linear(wide, cfg.out_hidden_size, ("mlp", "embed"), **kw)
        self.wide = wide

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.wide)  # 4 consecutive patches = one 2x2 merge block
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))  # nn.GELU() is the exact erf form


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: str = "none", scan: bool = True, rngs: nnx.Rngs):
        # Conv3d with kernel == stride over rows already flattened in (C, T, P, P) order is a matmul.
        self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, (None, "embed"), bias=False,
                                  std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.blocks = stacked(cfg.depth, lambda r: VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), rngs,
                              stack=scan)
        self.merger = PatchMerger(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg, self.dtype, self.remat = cfg, dtype, remat

    def rotary(self, pos_hw: jax.Array) -> tuple[jax.Array, jax.Array]:
        """2D rotary tables [N, head_dim] in fp32: cat(h*inv, w*inv) twice, hd/4 frequencies each."""
        half = self.cfg.head_dim // 2
        inv = 1.0 / (self.cfg.rope_theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
        freqs = pos_hw.astype(jnp.float32)[..., None] * inv  # [N, 2, hd/4]
        freqs = freqs.reshape(freqs.shape[0], -1)  # [h freqs, w freqs]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    def __call__(self, pixel_values: jax.Array, vi: VisionInputs) -> jax.Array:
        """pixel_values [N, C*T*P*P] -> merged embeddings [N/4, out_hidden_size] in input token order."""
        # Rows are permuted before the (row-wise) patch embedding, so no gradient flows through a gather.
        x = constrain(self.patch_embed(pixel_values[vi.patch_perm]), TOKENS)
        cos, sin = self.rotary(vi.pos_hw)
        is_full = np.isin(np.arange(self.cfg.depth), self.cfg.fullatt_block_indexes)  # per block

        def body(block, h, full):
            return constrain(block(h, cos, sin, full, vi), TOKENS), None

        x, _ = scan_layers(self.blocks, body, x, is_full, self.remat)
        return constrain(constrain(self.merger(x), TOKENS)[vi.merge_unperm], TOKENS)
