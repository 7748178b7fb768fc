"""Qwen2.5-VL for conditional generation (transformers' `Qwen2_5_VLForConditionalGeneration`) in Flax NNX.

Two ways to call it:
- Convenience (eager, concrete inputs): `model(input_ids, attention_mask, pixel_values=..., image_grid_thw=...)`
  computes vision index arrays and 3D positions on the host, like HF's forward.
- Under `jax.jit` (the documented path): compute `prepare_vision(image_grid_thw, config.vision)` and
  `get_rope_index(...)` on the host first, then pass `vision_inputs=`, `video_inputs=` and
  `position_ids=`; the jitted forward then only sees arrays of static shape.

Position defaults follow HF 5.24: with an image/video grid, `get_rope_index` (padding skipped);
without one, arange(T) on all axes for every row (padding not skipped).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...sharding import constrain
from .config import Qwen2_5_VLConfig
from .layers import param
from .rope_index import get_rope_index, prompt_positions
from .text import Cache, TextModel
from .vision import VisionInputs, VisionTower, prepare_vision


def _concrete(x: Any, what: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{what} must be computed on the host under jit: pass position_ids/vision_inputs/"
                         "video_inputs built with get_rope_index/prepare_vision")
    return np.asarray(x)


def _place(embeds: jax.Array, ids: jax.Array, token_id: int, feats: jax.Array) -> jax.Array:
    """masked_scatter of `feats` rows into the placeholder positions, batch-major then sequence order,
    as a static-shape gather: the k-th placeholder (cumsum of the mask) takes feats[k]."""
    b, t, d = embeds.shape
    is_tok = (ids == token_id).reshape(-1)
    if not isinstance(is_tok, jax.core.Tracer):
        n = int(np.asarray(is_tok).sum())
        if n != feats.shape[0]:
            raise ValueError(f"{n} placeholder tokens (id {token_id}) but {feats.shape[0]} feature rows")
    k = jnp.clip(jnp.cumsum(is_tok) - 1, 0, feats.shape[0] - 1)
    out = jnp.where(is_tok[:, None], feats[k].astype(embeds.dtype), embeds.reshape(-1, d))
    return out.reshape(b, t, d)


class LMHead(nnx.Module):
    """The untied output projection as HF stores it, weight [vocab, embed], used as the tied model uses its
    embedding table: logits = x @ weight^T. In this orientation the weight gradient (dlogits^T @ x, [V, D])
    runs ~1.3x faster on XLA:CPU than x^T @ dlogits into a [D, V] kernel (lm_head forward + backward
    with log-softmax at the benchmark's 1080 x 512 x 8192)."""

    def __init__(self, vocab: int, dim: int, std: float, param_dtype: Any, rngs: nnx.Rngs):
        self.weight = param(std * jax.random.normal(rngs.params(), (vocab, dim), param_dtype), ("vocab", "embed"))


class Qwen2_5_VL(nnx.Module):
    """Parameters: `visual.*` (vision tower), `language_model.*` (decoder), `lm_head.weight` unless tied.

    dtype is the compute dtype, param_dtype the storage dtype; norms, rotary tables and softmax run in
    fp32 as HF does. remat ("none" | "full" | "dots" | "offload") wraps the layer bodies; scan_layers=False
    holds each layer as its own module (parameters `layers.<i>.*`, `blocks.<i>.*`) and runs them as an unrolled
    loop instead of a scan over stacked parameters (faster steps for small models, compile time grows with depth);
    attention_query_chunk > 0 bounds the decoder's attention scores to that many queries at a time
    (long sequences: 5120 positions need it to fit a 7B GRPO micro-step on 32 GiB chips); attention
    ("xla" | "splash" | "cudnn", resolved by attention_kernels.resolve_attention) is the decoder's attention in
    forward passes and prefills (decode steps run xla; the kernels ignore attention_query_chunk).
    """

    def __init__(self, config: Qwen2_5_VLConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: str = "none", scan_layers: bool = True, attention_query_chunk: int = 0,
                 attention: str = "xla", rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.visual = VisionTower(config.vision, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                   scan=scan_layers, rngs=rngs)
        self.language_model = TextModel(config.text, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                        scan=scan_layers, query_chunk=attention_query_chunk, attention=attention,
                                        rngs=rngs)
        if not config.tie_word_embeddings:
            t = config.text
            self.lm_head = LMHead(t.vocab_size, t.hidden_size, t.initializer_range, param_dtype, rngs)

    # ------------------------------------------------------------------ pieces

    def get_image_features(self, pixel_values: jax.Array, vision_inputs: VisionInputs) -> jax.Array:
        """Merged vision embeddings [sum(t*h*w)/4, hidden] for all images (or videos), in order."""
        return self.visual(pixel_values, vision_inputs)

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              vision_inputs: VisionInputs | None = None, pixel_values_videos: jax.Array | None = None,
              video_inputs: VisionInputs | None = None) -> jax.Array:
        """Token embeddings with image/video features placed at their placeholder tokens: [B, T, D]."""
        for pix, vi, what in ((pixel_values, vision_inputs, "image"), (pixel_values_videos, video_inputs, "video")):
            if pix is not None and vi is None:
                raise ValueError(f"{what} pixels need their VisionInputs: prepare_vision({what}_grid_thw, config.vision)")
        x = constrain(self.language_model.embed(input_ids), ("batch", "length", "embed"))
        if pixel_values is not None:
            x = _place(x, input_ids, self.config.image_token_id, self.get_image_features(pixel_values, vision_inputs))
        if pixel_values_videos is not None:
            x = _place(x, input_ids, self.config.video_token_id,
                       self.get_image_features(pixel_values_videos, video_inputs))
        return constrain(x, ("batch", "length", "embed"))

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """lm_head on final hidden states (any leading shape), e.g. only a response span."""
        table = self.language_model.embed_tokens.embedding if self.config.tie_word_embeddings else self.lm_head.weight
        logits = jnp.einsum("...d,vd->...v", hidden.astype(self.dtype), table[...].astype(self.dtype))
        # [B, T, V] keeps the batch split and splits the vocabulary over `tensor` (the largest activation).
        return constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits

    def prepare_inputs(self, input_ids: Any, attention_mask: Any = None, image_grid_thw: Any = None,
                       video_grid_thw: Any = None, second_per_grid_ts: Any = None, position_ids: Any = None,
                       vision_inputs: VisionInputs | None = None, video_inputs: VisionInputs | None = None,
                       mm_token_type_ids: Any = None) -> tuple[Any, Any, Any]:
        """Host-side: fills in position_ids / vision_inputs / video_inputs the caller did not give."""
        cfg = self.config
        if vision_inputs is None and image_grid_thw is not None:
            vision_inputs = prepare_vision(_concrete(image_grid_thw, "image vision_inputs"), cfg.vision)
        if video_inputs is None and video_grid_thw is not None:
            video_inputs = prepare_vision(_concrete(video_grid_thw, "video vision_inputs"), cfg.vision)
        if position_ids is None:
            ids = _concrete(input_ids, "position_ids")
            if image_grid_thw is None and video_grid_thw is None:
                position_ids = prompt_positions(ids, None, None, cfg)  # text: the mask plays no part
            else:
                mask = None if attention_mask is None else _concrete(attention_mask, "position_ids")
                grids = [None if g is None else _concrete(g, "position_ids") for g in (image_grid_thw, video_grid_thw)]
                secs = None if second_per_grid_ts is None else _concrete(second_per_grid_ts, "position_ids")
                types = None if mm_token_type_ids is None else _concrete(mm_token_type_ids, "position_ids")
                position_ids, _ = get_rope_index(ids, mask, grids[0], grids[1], secs, cfg, types)
        return position_ids, vision_inputs, video_inputs

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      pixel_values: jax.Array | None = None, image_grid_thw: Any = None,
                      pixel_values_videos: jax.Array | None = None, video_grid_thw: Any = None,
                      second_per_grid_ts: Any = None, position_ids: jax.Array | None = None,
                      vision_inputs: VisionInputs | None = None, video_inputs: VisionInputs | None = None,
                      mm_token_type_ids: Any = None) -> jax.Array:
        """Final-normed hidden states [B, T, D] (before lm_head)."""
        position_ids, vision_inputs, video_inputs = self.prepare_inputs(
            input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts, position_ids,
            vision_inputs, video_inputs, mm_token_type_ids)
        x = self.embed(input_ids, pixel_values, vision_inputs, pixel_values_videos, video_inputs)
        hidden, _ = self.language_model(x, jnp.asarray(position_ids), attention_mask)
        return hidden

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 pixel_values: jax.Array | None = None, image_grid_thw: Any = None,
                 pixel_values_videos: jax.Array | None = None, video_grid_thw: Any = None,
                 second_per_grid_ts: Any = None, position_ids: jax.Array | None = None,
                 vision_inputs: VisionInputs | None = None, video_inputs: VisionInputs | None = None,
                 mm_token_type_ids: Any = None) -> jax.Array:
        """Logits [B, T, vocab], HF argument names and shapes (mm_token_type_ids is optional: it is
        derived from the placeholder ids when absent)."""
        return self.logits_from_hidden(self.hidden_states(
            input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
            second_per_grid_ts, position_ids, vision_inputs, video_inputs, mm_token_type_ids))

    # ------------------------------------------------------------------ KV cache (rollout)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
        return self.language_model.init_cache(batch, max_len, dtype)

    def decode_with_layer_caches(self, layers: list, inputs_embeds: jax.Array, position_ids: jax.Array,
                                 attention_mask: jax.Array, caches: list[Cache], cache_index: jax.Array | int
                                 ) -> tuple[jax.Array, list[Cache]]:
        """Logits [B, T, V] and the caches after writing T new tokens at [cache_index, cache_index + T), the
        layers unrolled over `language_model.layer_list()` with one cache per layer (what the rollout's decode
        loop runs; see TextModel.decode). attention_mask is [B, slots] over cache slots (see text.py)."""
        hidden, caches = self.language_model.decode(layers, inputs_embeds, position_ids, attention_mask, caches,
                                                    cache_index)
        return self.logits_from_hidden(hidden), caches
