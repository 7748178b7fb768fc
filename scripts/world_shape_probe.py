"""Can an object's shape be read from ShapeWorld's pixels, and does the base's vision tower read it?

Two readouts of the same targets, each one run:

    python scripts/world_shape_probe.py pixels
    python scripts/world_shape_probe.py tower [--model assets/world_base | --hidden 192 --depth 4] --steps 600

`pixels`: a two-layer MLP (256 wide, Adam 1e-3, 2,000 steps of 256) trained to name the shape of one object
(6 shapes, chance 1/6) from (a) the 28 px cell of the merged visual token that holds the object's centre,
which is what the tower's pretraining target asks one token to know, and (b) a 40 px crop centred on the
object. Objects of 6,000 training and 700 held-out scenes (base_train seed blocks 52 and 53, which neither the
base data nor the vision pretraining use); held-out accuracy per size class.

`tower`: viper_jax.world.vision_pretrain on the tower of `--model` (continued, in a copy) or of a fresh random
model with the world_base architecture but `--hidden` x `--depth` vision blocks; prints its accuracy at object
tokens every 50 steps (last 10 batches, as `viper world base` reports it).

Reads the scene graph to make targets, as the vision pretraining does; nothing here is training data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile

import numpy as np

from viper_common.shapeworld import render
from viper_common.shapeworld.scene import SHAPES, SIZES, sample_scene
from viper_common.shapeworld.splits import seed_block
from viper_jax.world.vision_pretrain import MERGED_PX, centre_token

SIZE = 112
TOKEN_PX = MERGED_PX  # one merged visual token
CROP_PX = 40


def object_crops(n_scenes: int, block: int) -> dict[str, np.ndarray]:
    """Per object: its token cell and its centred crop (flattened, in [0, 1]), shape and size indices."""
    seeds = seed_block("base_train", block, 1_000_000)
    cells, crops, shapes, sizes = [], [], [], []
    half = CROP_PX // 2
    for i in range(n_scenes):
        scene = sample_scene(np.random.default_rng(seeds[i]))
        image = np.asarray(render.render(scene, seeds[i], SIZE), np.float32) / 255.0
        padded = np.pad(image, ((half, half), (half, half), (0, 0)), mode="edge")
        for obj in scene.objects:
            x, y = render.object_centre(obj, SIZE)
            ty, tx = divmod(centre_token(obj, SIZE), SIZE // TOKEN_PX)
            cells.append(image[ty * TOKEN_PX:(ty + 1) * TOKEN_PX, tx * TOKEN_PX:(tx + 1) * TOKEN_PX].ravel())
            crops.append(padded[int(y):int(y) + CROP_PX, int(x):int(x) + CROP_PX].ravel())
            shapes.append(SHAPES.index(obj.shape))
            sizes.append(SIZES.index(obj.size))
    return {"cell": np.stack(cells), "crop": np.stack(crops), "shape": np.asarray(shapes), "size": np.asarray(sizes)}


def mlp_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 sizes_test: np.ndarray, steps: int = 2000) -> dict[str, float]:
    """Held-out accuracy of a 2-layer MLP on standardised inputs, overall and per size class."""
    import jax
    import jax.numpy as jnp
    import optax

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    d = x_train.shape[1]
    params = {"w1": jax.random.normal(k1, (d, 256)) / np.sqrt(d), "b1": jnp.zeros(256),
              "w2": jax.random.normal(k2, (256, len(SHAPES))) / 16.0, "b2": jnp.zeros(len(SHAPES))}
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3

    def logits(p, x):
        return jax.nn.relu(((x - mean) / std) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    optimizer = optax.adam(1e-3)
    state = optimizer.init(params)

    @jax.jit
    def step(p, s, x, y):
        grads = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(logits(q, x), y).mean())(p)
        updates, s = optimizer.update(grads, s)
        return optax.apply_updates(p, updates), s

    rng = np.random.default_rng(0)
    for _ in range(steps):
        rows = rng.integers(0, len(y_train), 256)
        params, state = step(params, state, x_train[rows], y_train[rows])
    right = np.asarray(logits(params, x_test).argmax(-1)) == y_test
    return {"all": round(float(right.mean()), 3)} | {
        name: round(float(right[sizes_test == k].mean()), 3) for k, name in enumerate(SIZES)}


def run_pixels() -> None:
    train, test = object_crops(6000, 52), object_crops(700, 53)
    print(f"objects: {len(train['shape'])} training, {len(test['shape'])} held out; chance {1 / len(SHAPES):.3f}")
    for key, what in (("cell", f"the {TOKEN_PX} px token cell holding the centre"),
                      ("crop", f"a {CROP_PX} px crop centred on the object")):
        acc = mlp_accuracy(train[key], train["shape"], test[key], test["shape"], test["size"])
        print(f"shape from {what}: {json.dumps(acc)}")


def run_tower(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from viper_jax.tiny import write_random_model
    from viper_jax.world.base import base_config, model_config
    from viper_jax.world.vision_pretrain import pretrain_vision

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = f"{tmp}/model"
        if args.hidden:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            arch = base_config().model
            arch.vision_hidden, arch.vision_depth = args.hidden, args.depth
            write_random_model(model_dir, model_config(tokenizer, arch), tokenizer, seed=0)
        else:
            shutil.copytree(args.model, model_dir)
        summary = pretrain_vision(model_dir, steps=args.steps, batch_size=32, learning_rate=args.lr, size=SIZE,
                                  seed=args.seed, pool_scenes=args.pool, workers=2)
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="readout", required=True)
    sub.add_parser("pixels", help="an MLP on the pixels")
    tower = sub.add_parser("tower", help="the vision pretraining's accuracy")
    tower.add_argument("--model", default="assets/world_base",
                       help="HF dir whose tower is trained on (or whose tokenizer a fresh model gets)")
    tower.add_argument("--hidden", type=int, default=0, help="a fresh tower this wide (0: continue --model's)")
    tower.add_argument("--depth", type=int, default=3, help="blocks of the fresh tower")
    tower.add_argument("--steps", type=int, default=600)
    tower.add_argument("--lr", type=float, default=1e-3)
    tower.add_argument("--seed", type=int, default=0, help="the readout head's init")
    tower.add_argument("--pool", type=int, default=0, help="scenes rendered once and reused (0: fresh scenes)")
    args = parser.parse_args()
    run_pixels() if args.readout == "pixels" else run_tower(args)


if __name__ == "__main__":
    main()
