"""Can a tiny Qwen2.5-VL learn to read a ShapeWorld image, and through which readout? One measurement per run.

The task is the simplest perception there is: the hue of the one object in a 112 px image (8 hues; chance
12.5%), or with --objects 5 the hue of the object in a named cell of a scene of 1-5 objects. Readouts:

  tower_max / tower_mean  the vision tower's 16 merged tokens, max- or mean-pooled, then a linear layer
  mlp_max / mlp_mean      a per-patch MLP on the raw pixel rows (no vision tower), max- or mean-pooled
  decoder                 the whole model: [vision_start, 16 image tokens, vision_end, question token] and
                          the decoder's last position predicts the hue; the uniform attention of a fresh
                          decoder is a mean pool over the image tokens

--pretrain N first trains the tower with the base's own vision pretraining (world/vision_pretrain.py);
--freeze keeps the tower fixed afterwards (as `viper world base` does during its SFT).

    python scripts/world_read_probe.py --readout decoder --pretrain 300 --freeze

Scenes come from two blocks of the base_train seed range (train and held-out); nothing here touches the
benchmark. Prints train loss and held-out accuracy every 25 steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from viper_common.shapeworld import render
from viper_common.shapeworld import scene as S
from viper_common.shapeworld.splits import seed_block
from viper_jax.data.processing import make_image_processor
from viper_jax.models.qwen2_5_vl import (Qwen2_5_VL, Qwen2_5_VLConfig, TextConfig, VisionConfig, load_hf,
                                         prepare_vision, save_hf)
from viper_jax.models.qwen2_5_vl.rope_index import prompt_positions

SIZE, TOKENS, DIM = 112, 16, 128
IMG, VS, VE, PAD, EOS, VIDEO, Q0 = 40, 41, 42, 44, 43, 45, 50  # a 64-token toy vocabulary; hues are ids 0-7


def model_config() -> Qwen2_5_VLConfig:
    """configs/world_base.py's architecture (text 128 x 4, vision 96 x 3) on a toy vocabulary."""
    text = TextConfig(vocab_size=64, hidden_size=DIM, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, mrope_section=(6, 5, 5),
                      bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD)
    vision = VisionConfig(depth=3, hidden_size=96, intermediate_size=192, num_heads=4, out_hidden_size=DIM,
                          fullatt_block_indexes=(2,), tokens_per_second=2)
    return Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=IMG, video_token_id=VIDEO,
                            vision_start_token_id=VS, vision_end_token_id=VE, tie_word_embeddings=True)


def batch(seeds, processor, cfg, max_objects: int) -> dict:
    images, cells, hues = [], [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        scene = S.sample_scene(rng, 1, max_objects)
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        images.append(render.render(scene, seed, SIZE))
        cells.append(obj.cell)
        hues.append(S.HUES.index(obj.hue))
    out = processor(images=images, return_tensors="np")
    grid = np.asarray(out["image_grid_thw"], np.int32)
    ids = np.array([[VS] + [IMG] * TOKENS + [VE] + [Q0 + c] for c in cells], np.int32)
    return dict(pix=np.asarray(out["pixel_values"], np.float32), vi=prepare_vision(grid, cfg.vision), ids=ids,
                pos=prompt_positions(ids, np.ones_like(ids), grid, cfg).astype(np.int32), y=np.array(hues, np.int32))


def make_model(cfg: Qwen2_5_VLConfig, pretrain: int) -> nnx.Module:
    from viper_jax.world.vision_pretrain import pretrain_vision

    model = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0), scan_layers=False)
    if not pretrain:
        return model
    with tempfile.TemporaryDirectory() as d:  # the base's own path: an HF directory, pretrained in place
        save_hf(model, None, d)
        print(pretrain_vision(d, steps=pretrain, batch_size=32, learning_rate=1e-3, size=SIZE), flush=True)
        return load_hf(d, scan_layers=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readout", default="decoder", choices=("decoder", "tower_max", "tower_mean", "mlp_max", "mlp_mean"))
    p.add_argument("--objects", type=int, default=1, help="scenes of 1..N objects (N > 1: ask by cell)")
    p.add_argument("--pretrain", type=int, default=0, help="vision pretraining steps first")
    p.add_argument("--freeze", action="store_true", help="keep the tower fixed after pretraining")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    cfg, processor = model_config(), make_image_processor(SIZE * SIZE, SIZE * SIZE)
    model = make_model(cfg, args.pretrain)
    keys = jax.random.split(jax.random.key(0), 3)
    mlp = {"w1": jax.random.normal(keys[0], (cfg.vision.patch_dim, DIM)) * 0.03,
           "w2": jax.random.normal(keys[1], (DIM, DIM)) * 0.09}
    head = nnx.Linear(DIM, 8, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split((model, head), nnx.Param)
    params = {"nnx": params, "mlp": mlp}

    def logits_of(params, b):
        m, h = nnx.merge(graphdef, params["nnx"])
        pool = jnp.max if args.readout.endswith("max") else jnp.mean
        if args.readout.startswith("mlp"):
            x = b["pix"].reshape(-1, 64, cfg.vision.patch_dim)
            return h(pool(jax.nn.gelu(jax.nn.gelu(x @ params["mlp"]["w1"]) @ params["mlp"]["w2"]), axis=1))
        feats = m.get_image_features(b["pix"], b["vi"])
        if args.freeze:
            feats = jax.lax.stop_gradient(feats)
        if args.readout.startswith("tower"):
            return h(pool(feats.reshape(-1, TOKENS, DIM), axis=1))
        x = m.language_model.embed(b["ids"]).at[:, 1:1 + TOKENS].set(feats.reshape(-1, TOKENS, DIM))
        hidden, _ = m.language_model(x, b["pos"], jnp.ones_like(b["ids"]))
        return m.logits_from_hidden(hidden[:, -1])[:, :8]

    opt = optax.adam(args.lr)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, b):
        loss, grads = jax.value_and_grad(
            lambda q: optax.softmax_cross_entropy_with_integer_labels(logits_of(q, b), b["y"]).mean())(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    accuracy = jax.jit(lambda params, b: (logits_of(params, b).argmax(-1) == b["y"]).mean())
    train, held_out = seed_block("base_train", 60, 1_000_000), seed_block("base_train", 61, 256)
    test = batch(held_out, processor, cfg, args.objects)
    start = time.perf_counter()
    for k in range(1, args.steps + 1):
        params, opt_state, loss = step(params, opt_state,
                                       batch(train[(k - 1) * 32:k * 32], processor, cfg, args.objects))
        if k % 25 == 0:
            print(f"step {k}: loss {float(loss):.3f}, held-out accuracy {float(accuracy(params, test)):.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
