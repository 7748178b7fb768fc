"""Pretraining the ShapeWorld base's vision tower: the world's stand-in for the image-text pretraining that
gives a real Qwen2.5-VL its vision encoder before any instruction tuning.

Why it exists (measured, docs/shapeworld.md "Why the base needs a pretrained vision tower"): a tiny
Qwen2.5-VL trained end to end from random init never learns to read its images on this machine's budget.
At init the decoder's attention is uniform, so what reaches an answer token is the MEAN of the image's
tokens, in which one object is a few percent of the signal against a varying background; even a per-patch
MLP read through a mean pool stays at chance on "which colour is the one object" after 150 steps, while
the same MLP read through a max pool reaches 79%. With a tower pretrained here and then frozen, the
decoder answers that question right 72.7% of the time after 50 steps and 89.5% after 150
(scripts/world_read_probe.py).

The objective is dense and coarse: for every merged visual token (a 28 px cell at 112 px), the hue, shape
and size of the object whose centre lies in that cell (or "none"), and the image's background, read by a
linear head that is thrown away afterwards. Fine attributes (shade, pattern, label letter) are NOT targets:
the tower encodes them only as far as the coarse task makes it, so the base is mediocre at fine detail, as
real VLMs are, and ViPER has room to improve it.

Scenes come from their own block of the base_train seed range (never val / test / synth); reading their
scene graph is what building the base's data does anyway (the describe answers are captions of it). With
`pool_scenes`, that many are rendered once and drawn from, mirrored at random: rendering costs more than a
tower step, and shape is learnt only after thousands of steps (0.19 after 600, 0.86 after 10,000 held out).
Accuracy is also measured on fresh scenes of another block (`held_out_accuracy`).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from viper_common.shapeworld import render
from viper_common.shapeworld.scene import BACKGROUNDS, HUES, SHAPES, SIZES, Obj, Scene, sample_scene
from viper_common.shapeworld.splits import seed_block

# Per-token targets: index len(choices) means "no object centre in this token".
TARGETS = {"hue": HUES, "shape": SHAPES, "size": SIZES}
SEED_BLOCK = 50  # base_train seeds 50M..51M; base_data uses seeds from 0 up (n_train < 50M)
HELD_OUT_BLOCK = 55  # fresh scenes to measure the tower on (world_shape_probe.py uses blocks 52 and 53)
HELD_OUT_BATCHES = 10
BLOCK_SIZE = 1_000_000
MERGED_PX = 28  # 14 px patches, 2x2 merge


def centre_token(obj: Obj, size: int) -> int:
    """Row-major index of the merged token (MERGED_PX square) that holds the object's centre."""
    side = size // MERGED_PX
    x, y = render.object_centre(obj, size)
    return min(int(y // MERGED_PX), side - 1) * side + min(int(x // MERGED_PX), side - 1)


def token_targets(scene: Scene, size: int) -> dict[str, np.ndarray]:
    """{'hue'|'shape'|'size': [T] int32 per merged token, row-major; 'background': [] int32}."""
    side = size // MERGED_PX
    out = {k: np.full(side * side, len(v), np.int32) for k, v in TARGETS.items()}
    for obj in scene.objects:
        t = centre_token(obj, size)
        for k, choices in TARGETS.items():
            out[k][t] = choices.index(getattr(obj, k))
    out["background"] = np.asarray(BACKGROUNDS.index(scene.background), np.int32)
    return out


def _batch(image_processor: Any, images: np.ndarray, targets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = image_processor(images=list(images), return_tensors="np")
    return targets | {"pixel_values": np.asarray(out["pixel_values"], np.float32),
                      "image_grid_thw": np.asarray(out["image_grid_thw"], np.int32)}


def batches(image_processor: Any, size: int, batch_size: int, seeds: range) -> Iterator[dict[str, np.ndarray]]:
    """Rendered scenes (seed i draws and renders scene i), consecutive seeds -> pixel rows, grids and
    per-token targets."""
    for start in range(seeds.start, seeds.stop - batch_size + 1, batch_size):
        yield _batch(image_processor, *_render_chunk(size, start, start + batch_size))


def _render_chunk(size: int, start: int, stop: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    images, targets = [], []
    for seed in range(start, stop):
        scene = sample_scene(np.random.default_rng(seed))
        images.append(np.asarray(render.render(scene, seed, size), np.uint8))
        targets.append(token_targets(scene, size))
    return np.stack(images), {k: np.stack([t[k] for t in targets]) for k in targets[0]}


def render_pool(size: int, seeds: range, workers: int = 1, chunk: int = 500
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Scenes seeds[i] rendered once: uint8 images [N, size, size, 3] and their stacked token_targets. Rendering
    (a 4x supersampled PIL drawing, about 10 ms a scene) costs more than a tower step: a pool drawn from
    many times lets the pretraining run several times the steps in the same time."""
    jobs = [(size, a, min(a + chunk, seeds.stop)) for a in range(seeds.start, seeds.stop, chunk)]
    if workers == 1 or len(jobs) < 2:
        parts = [_render_chunk(*job) for job in jobs]
    else:  # spawn: JAX's threads do not fork
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_render_chunk, *zip(*jobs)))
    return np.concatenate([p[0] for p in parts]), {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}


def mirror(images: np.ndarray, targets: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Left-right mirror images [B, H, W, 3] and their per-token targets [B, T]. All six shapes are
    mirror-symmetric, so a mirrored scene's targets are the same objects in mirrored tokens."""
    side = int(round(targets["hue"].shape[1] ** 0.5))
    flipped = {k: (v.reshape(len(v), side, side)[:, :, ::-1].reshape(len(v), -1) if v.ndim == 2 else v)
               for k, v in targets.items()}
    return images[:, :, ::-1], flipped


def pool_batches(image_processor: Any, images: np.ndarray, targets: dict[str, np.ndarray], batch_size: int,
                 seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches drawn at random from a rendered pool, each image mirrored with probability 1/2."""
    rng = np.random.default_rng(seed)
    while True:
        rows = rng.integers(0, len(images), batch_size)
        flip = rng.random(batch_size) < 0.5
        imgs, tgts = images[rows], {k: v[rows] for k, v in targets.items()}
        m_imgs, m_tgts = mirror(imgs[flip], {k: v[flip] for k, v in tgts.items()})
        imgs[flip] = m_imgs
        for k in tgts:
            tgts[k][flip] = m_tgts[k]
        yield _batch(image_processor, imgs, tgts)


class Head(nnx.Module):
    """Linear readouts of the merged tokens (the tower's output, out_hidden_size wide)."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.tokens = nnx.Dict({k: nnx.Linear(dim, len(v) + 1, rngs=rngs) for k, v in TARGETS.items()})
        self.background = nnx.Linear(dim, len(BACKGROUNDS), rngs=rngs)


def _loss(tower: Any, head: Head, batch: dict[str, Any], vision_inputs: Any, tokens_per_image: int
          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    feats = tower(batch["pixel_values"], vision_inputs).reshape(-1, tokens_per_image, head.background.in_features)
    losses, acc = {}, {}
    for k, layer in head.tokens.items():
        logits = layer(feats)
        losses[k] = optax.softmax_cross_entropy_with_integer_labels(logits, batch[k]).mean()
        is_object = batch[k] < len(TARGETS[k])  # accuracy where an object's centre is: "none" is most tokens
        acc[k] = ((logits.argmax(-1) == batch[k]) * is_object).sum() / jnp.maximum(is_object.sum(), 1)
    logits = head.background(feats.mean(1))
    losses["background"] = optax.softmax_cross_entropy_with_integer_labels(logits, batch["background"]).mean()
    acc["background"] = (logits.argmax(-1) == batch["background"]).mean()
    return sum(losses.values()), acc


def pretrain_vision(model_dir: str | Path, *, steps: int, batch_size: int, learning_rate: float, size: int,
                    seed: int = 0, pool_scenes: int = 0, workers: int = 1, log: Any = None) -> dict[str, Any]:
    """Trains the vision tower of the HF model in `model_dir` in place (only `visual.*` changes); returns
    {steps, seconds, accuracy: per target on the last 10 batches (at object tokens for the token targets),
    held_out_accuracy: the same on fresh scenes}. `pool_scenes` > 0: batches come from that many scenes
    rendered once (render_pool, in `workers` processes) and mirrored at random; 0: a fresh scene per image."""
    from viper_jax.data.processing import make_image_processor
    from viper_jax.models.qwen2_5_vl import load_hf, prepare_vision, save_hf

    log = log or sys.stderr
    model = load_hf(model_dir, scan_layers=False)
    cfg = model.config
    processor = make_image_processor(size * size, size * size)
    tokens_per_image = (size // MERGED_PX) ** 2
    head = Head(cfg.vision.out_hidden_size, nnx.Rngs(seed))
    warmup = min(50, steps // 5)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                  learning_rate * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    graphdef, params = nnx.split((model.visual, head), nnx.Param)
    opt_state = optimizer.init(params)

    @jax.jit
    def accuracy(params, batch, vision_inputs):
        tower, h = nnx.merge(graphdef, params)
        return _loss(tower, h, batch, vision_inputs, tokens_per_image)[1]

    @jax.jit
    def step(params, opt_state, batch, vision_inputs):
        def loss_fn(p):
            tower, h = nnx.merge(graphdef, p)
            return _loss(tower, h, batch, vision_inputs, tokens_per_image)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    start, recent = time.perf_counter(), []
    if pool_scenes > 0:
        images, targets = render_pool(size, seed_block("base_train", SEED_BLOCK, BLOCK_SIZE)[:pool_scenes], workers)
        print(f"  vision pretraining: {pool_scenes} scenes rendered ({time.perf_counter() - start:.0f} s)",
              file=log, flush=True)
        data = pool_batches(processor, images, targets, batch_size, seed)
    else:
        data = batches(processor, size, batch_size, seed_block("base_train", SEED_BLOCK, BLOCK_SIZE))
    vision_inputs = None
    for k in range(1, steps + 1):
        batch = next(data)
        grid = batch.pop("image_grid_thw")
        if vision_inputs is None:  # every image has the same grid
            vision_inputs = prepare_vision(grid, cfg.vision)
        params, opt_state, loss, acc = step(params, opt_state, batch, vision_inputs)
        recent = (recent + [jax.device_get(acc)])[-10:]
        if k % 50 == 0 or k == steps:
            print(f"  vision pretraining {k}/{steps}: loss {float(loss):.3f} accuracy {_mean_accuracy(recent)} "
                  f"({time.perf_counter() - start:.0f} s)", file=log, flush=True)
    held_out = batches(processor, size, batch_size, seed_block("base_train", HELD_OUT_BLOCK, BLOCK_SIZE))
    fresh = []
    for _ in range(HELD_OUT_BATCHES if steps else 0):
        batch = next(held_out)
        batch.pop("image_grid_thw")
        fresh.append(jax.device_get(accuracy(params, batch, vision_inputs)))
    tower, _ = nnx.merge(graphdef, params)
    model.visual = tower
    save_hf(model, None, model_dir)  # the tokenizer files stay where they are
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "accuracy": _mean_accuracy(recent),
            "held_out_accuracy": _mean_accuracy(fresh), "pool_scenes": pool_scenes}


def _mean_accuracy(recent: list[dict[str, Any]]) -> dict[str, float]:
    """Per target, the mean accuracy over the recent batches ({} before the first)."""
    return {n: round(float(np.mean([a[n] for a in recent])), 3) for n in recent[0]} if recent else {}
