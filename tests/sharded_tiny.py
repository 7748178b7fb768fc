"""A tiny Qwen2.5-VL whose head counts, MLP widths and vocabulary all divide by 8, with image inputs,
for the sharding tests (not a test module). No torch: the reference is the same JAX model on one device.

Text: 16 heads / 8 KV heads (grouped attention kept), hidden 128, MLP 256, vocabulary 1000 (= 8 x 125).
Vision: 8 heads of dim 4, hidden 32, MLP 64, 2 blocks (one windowed, one full). Batch: 8 rows, one
image each (4x4 or 4x8 patches), left-padded; 192 patches in all.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, TextConfig, VisionConfig, get_rope_index
from viper_jax.models.qwen2_5_vl import prepare_vision
from viper_jax.sharding import DEFAULT_RULES, logical_to_spec, use_mesh

IMAGE, VIDEO, VSTART, VEND, PAD = 997, 998, 995, 996, 2
PATCH_DIM = 3 * 2 * 14 * 14


def tiny_config(**text: Any) -> Qwen2_5_VLConfig:
    t = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=16,
             num_key_value_heads=8, rms_norm_eps=1e-6, mrope_section=(1, 1, 2), bos_token_id=0, eos_token_id=1,
             pad_token_id=PAD)
    t.update(text)
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=8, out_hidden_size=t["hidden_size"],
                          fullatt_block_indexes=(1,), tokens_per_second=2)
    return Qwen2_5_VLConfig(text=TextConfig(**t), vision=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                            vision_start_token_id=VSTART, vision_end_token_id=VEND)


def abstract_model(cfg: Qwen2_5_VLConfig) -> Qwen2_5_VL:
    return nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))


def tiny_params(cfg: Qwen2_5_VLConfig, seed: int = 0) -> tuple[Any, dict]:
    """(graphdef, pure dict of NumPy fp32 parameters), every value re-drawn so that no bias is 0 and no
    norm is 1 (the same on every process: NumPy with a fixed seed)."""
    abstract = abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: Any) -> np.ndarray:
        name = str(path[-1].key)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "scale":
            return 1.0 + 0.2 * noise
        if name == "bias":
            return 0.2 * noise
        if name == "embedding":
            return 0.5 * noise
        stacked = any(str(getattr(k, "key", "")) in ("layers", "blocks") for k in path)
        fan_in = leaf.shape[1] if stacked else leaf.shape[0]
        return noise / np.float32(np.sqrt(fan_in))

    return graphdef, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))


def tiny_batch(cfg: Qwen2_5_VLConfig, rows: int = 8, seed: int = 1) -> dict[str, Any]:
    """NumPy inputs with host-prepared positions and vision indices (the jit path), plus a loss mask."""
    rng = np.random.default_rng(seed)
    ids_rows, pixels, grids = [], [], []
    for r in range(rows):
        t, h, w = (1, 4, 4) if r % 2 == 0 else (1, 4, 8)
        n_pre, n_post = int(rng.integers(1, 4)), int(rng.integers(2, 5))
        ids_rows.append(rng.integers(3, 990, n_pre).tolist() + [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]
                        + rng.integers(3, 990, n_post).tolist())
        grids.append([t, h, w])
        pixels.append(rng.standard_normal((t * h * w, PATCH_DIM)).astype(np.float32))
    width = max(len(r) for r in ids_rows)
    input_ids = np.full((rows, width), PAD, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for b, r in enumerate(ids_rows):
        input_ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    grid = np.asarray(grids, np.int64)
    pos, _ = get_rope_index(input_ids, mask, grid, None, None, cfg)
    return dict(input_ids=input_ids, attention_mask=mask, position_ids=np.asarray(pos, np.int32),
                pixel_values=np.concatenate(pixels), vision_inputs=prepare_vision(grid, cfg.vision))


# Logical names of each input (the vision index arrays are small and replicated).
INPUT_NAMES = {"input_ids": ("batch", "length"), "attention_mask": ("batch", "length"),
               "position_ids": (None, "batch", "length"), "pixel_values": ("vision_tokens", None)}


def batch_shardings(mesh: Any, batch: dict[str, Any], rules: Any = DEFAULT_RULES) -> dict[str, Any]:
    def one(key: str, leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, logical_to_spec(INPUT_NAMES.get(key), rules))

    return {k: (jax.tree.map(lambda x: one(k, x), v) if k == "vision_inputs" else one(k, v)) for k, v in batch.items()}


def loss_fn(graphdef: Any):
    """(params, batch) -> (mean next-token cross-entropy over real tokens, logits)."""

    def loss(params: Any, batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params)
        logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                       position_ids=batch["position_ids"], vision_inputs=batch["vision_inputs"])
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        target = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
        weight = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).astype(jnp.float32)
        return -(target * weight).sum() / weight.sum(), logits

    return loss


def forward_backward(graphdef: Any, params: Any, batch: dict[str, Any], mesh: Any = None,
                     param_shardings: Any = None, rules: Any = DEFAULT_RULES) -> tuple[Any, Any, Any]:
    """(loss, logits, grads) as jax arrays; sharded when a mesh is given (params/batch placed by caller
    or here), with the model's activation constraints active."""
    loss = loss_fn(graphdef)

    def step(p: Any, b: Any) -> tuple[Any, Any, Any]:
        if mesh is None:
            (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(p, b)
        else:
            with use_mesh(mesh, rules):
                (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(p, b)
        return value, logits, grads

    if mesh is None:
        return jax.jit(step)(params, batch)
    b_sh = batch_shardings(mesh, batch, rules)
    fn = jax.jit(step, in_shardings=(param_shardings, b_sh), out_shardings=(None, None, param_shardings))
    return fn(params, batch)
