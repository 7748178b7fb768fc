"""The SFT update: answer-token cross-entropy, one jitted, sharded, donated step per batch.

loss = sum over the batch's answer tokens of w * -log p(token | everything before it)
       / sum of w over the batch's answer tokens
(a token mean over the whole batch, so every answer token weighs the same whatever its row's length;
prompt, image-pad and padding positions have weight 0). w is 1, or loss_weights' curriculum: only the
focus tokens (the words that state what the images show) in a first phase, focus tokens weighted up after.
The update is train.state.make_train_step's: gradient, global-norm clip + AdamW (train/optim.py), and a
non-finite loss or gradient leaves the state untouched and counts one `skipped`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, prepare_vision
from viper_jax.models.qwen2_5_vl.rope_index import prompt_positions
from viper_jax.sharding import batch_sharding
from viper_jax.train.grpo_step import response_logprobs
from viper_jax.train.state import TrainState, make_train_step

ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")


def pad_images(grid: np.ndarray, pixels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(grid, pixels) with copies of the last image's grid (zero pixel rows) appended up to `count`
    images. The vision program's shapes then stay the same whether a batch holds 1- or 2-image rows.
    The extra images are computed and unused: the k-th image placeholder takes the k-th feature row,
    and the vision tower attends within each image, so real features, loss and gradients are unchanged."""
    extra = count - len(grid)
    if extra <= 0:
        return grid, pixels
    rows = int(np.prod(grid[-1])) * extra
    return (np.concatenate([grid, np.repeat(grid[-1:], extra, axis=0)]),
            np.concatenate([pixels, np.zeros((rows, pixels.shape[1]), pixels.dtype)]))


def loss_weights(batch: dict[str, Any], focus_only: bool = False, focus_weight: float = 1.0) -> np.ndarray:
    """[B, T] float32 loss weights: the answer tokens (loss_mask), or only the focus tokens when `focus_only`
    (rows without any weigh nothing); otherwise focus tokens weigh `focus_weight`, other answer tokens 1."""
    answer = np.asarray(batch["loss_mask"], np.float32)
    focus = np.asarray(batch.get("focus_mask", np.zeros_like(answer)), np.float32)
    if focus_only:
        return focus
    return answer + (focus_weight - 1.0) * focus


def model_inputs(batch: dict[str, Any], config: Qwen2_5_VLConfig, images_per_batch: int = 0,
                 focus_only: bool = False, focus_weight: float = 1.0) -> dict[str, Any]:
    """Host-side: the pipeline's batch -> the jitted step's inputs (MRoPE positions over prompt +
    answer exactly as get_rope_index gives them, the vision tower's index arrays, real pixel rows,
    padded to `images_per_batch` images by pad_images when that is > 0, loss_weights' `loss_mask`)."""
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    grid = np.asarray(batch["image_grid_thw"], np.int32).reshape(-1, 3)
    if len(grid) == 0:  # every record kind has 1 or 2 images; a text-only batch would need another program
        raise ValueError("an SFT batch without images")
    if 0 < images_per_batch < len(grid):
        raise ValueError(f"a batch holds {len(grid)} images, more than sft.images_per_batch={images_per_batch} "
                         f"(2 x data.batch_size covers records of 1 or 2 images)")
    positions = prompt_positions(ids, mask, grid, config).astype(np.int32)
    vision_grid, pixels = pad_images(grid, np.asarray(batch["pixel_values"])[:int(batch["num_patches"])],
                                     images_per_batch)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_weights(batch, focus_only, focus_weight),
            "positions": positions, "pixel_values": pixels, "vision_inputs": prepare_vision(vision_grid, config.vision)}


def answer_loss(model: Qwen2_5_VL, inputs: dict[str, Any], logit_chunk: int = 0) -> tuple[jax.Array, dict]:
    """(weighted mean answer-token NLL of the batch, {"answer_tokens": sum of weights}). Position t predicts
    token t+1; `loss_mask` holds the weights."""
    x = model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["vision_inputs"])
    hidden, _ = model.language_model(x, inputs["positions"], inputs["attention_mask"])
    logp, _ = response_logprobs(model, hidden[:, :-1], inputs["input_ids"][:, 1:], 1.0, logit_chunk)
    weight = inputs["loss_mask"][:, 1:].astype(jnp.float32)
    count = weight.sum()
    return -(logp * weight).sum() / jnp.maximum(count, 1.0), {"answer_tokens": count}


def input_shardings(mesh: Any, rules: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Rows split over the batch mesh axes (positions: its row axis is the second); pixels and the
    vision tower's index arrays replicated (they are per image, not per row)."""
    rows = batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, P())
    out = {k: rows for k in ROW_KEYS}
    out.update(positions=NamedSharding(mesh, P(None, *rows.spec)), pixel_values=replicated, vision_inputs=replicated)
    return out


def make_sft_step(graphdef: Any, optimizer: optax.GradientTransformation, shardings: TrainState, mesh: Any,
                  rules: Sequence[tuple[str, Any]], logit_chunk: int = 0
                  ) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, Any]]]:
    """`step(state, model_inputs) -> (state, {loss, grad_norm, skipped, aux: {answer_tokens}})`."""
    loss_fn = lambda params, inputs: answer_loss(nnx.merge(graphdef, params), inputs, logit_chunk)
    return make_train_step(loss_fn, optimizer, shardings, input_shardings(mesh, rules), rules)
