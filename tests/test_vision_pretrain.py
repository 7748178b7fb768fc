"""The ShapeWorld base's vision pretraining (viper_jax/world/vision_pretrain.py): its per-token targets, and
that it trains the tower of an HF directory in place and nothing else."""

import jax
import numpy as np
from flax import nnx

from viper_common.shapeworld.scene import Obj, Scene
from viper_jax.models.qwen2_5_vl import load_hf
from viper_jax.tiny import write_tiny_model
from viper_jax.world import vision_pretrain


def _obj(**kw):
    base = dict(shape="circle", hue="red", shade="dark", size="small", pattern="solid", label="", cell=0,
                dx=0.0, dy=0.0)
    return Obj(**{**base, **kw})


def test_token_targets_mark_the_token_under_each_object_centre():
    # 112 px: a 4x4 grid of 28 px tokens; cell centres of the 3x3 grid sit at 18.7, 56 and 93.3 px.
    scene = Scene("navy", (_obj(cell=0), _obj(cell=4, hue="blue", shape="star", size="large"),
                           _obj(cell=8, hue="gray", shape="cross", size="medium", dx=-0.2, dy=0.2)))
    t = vision_pretrain.token_targets(scene, 112)
    none = {k: len(v) for k, v in vision_pretrain.TARGETS.items()}
    hue = np.full(16, none["hue"])
    hue[0] = 0                 # red, top left token (18.7, 18.7)
    hue[2 * 4 + 2] = 4         # blue, centre (56, 56) -> token row 2, col 2
    hue[3 * 4 + 3] = 7         # gray: x = (2.3) * 37.3 = 85.9 px -> col 3; y = 2.7 * 37.3 = 100.8 -> row 3
    np.testing.assert_array_equal(t["hue"], hue)
    assert t["shape"][10] == 3 and t["size"][10] == 2 and t["shape"][15] == 5 and t["size"][15] == 1
    assert int(t["background"]) == 4
    assert (t["shape"] == none["shape"]).sum() == 13


def test_pretraining_changes_only_the_vision_tower(tmp_path):
    model_dir = write_tiny_model(tmp_path / "m")
    before = nnx.to_pure_dict(nnx.state(load_hf(model_dir, scan_layers=False), nnx.Param))
    summary = vision_pretrain.pretrain_vision(model_dir, steps=3, batch_size=4, learning_rate=1e-2, size=56,
                                             pool_scenes=8)
    after = nnx.to_pure_dict(nnx.state(load_hf(model_dir, scan_layers=False), nnx.Param))
    assert summary["steps"] == 3 and set(summary["accuracy"]) == {"hue", "shape", "size", "background"}
    assert set(summary["held_out_accuracy"]) == set(summary["accuracy"])
    changed = lambda a, b: any(not np.array_equal(x, y)
                               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert changed(before["visual"], after["visual"])
    assert not changed(before["language_model"], after["language_model"])
    assert (model_dir / "tokenizer_config.json").exists()  # the directory stays a loadable HF model


def test_a_mirrored_scene_has_its_targets_in_mirrored_tokens():
    # A star in the top-left cell, mirrored, is the star in the top-right cell of the same scene: the mirror of
    # the image's targets must equal the targets of the scene with the object's column reversed.
    left = Scene("navy", (_obj(cell=0, shape="star", hue="blue", size="large", dx=0.1),))
    right = Scene("navy", (_obj(cell=2, shape="star", hue="blue", size="large", dx=-0.1),))
    image = np.arange(112 * 112 * 3, dtype=np.int64).reshape(1, 112, 112, 3)
    targets = {k: v[None] for k, v in vision_pretrain.token_targets(left, 112).items()}
    mirrored_image, mirrored = vision_pretrain.mirror(image, targets)
    np.testing.assert_array_equal(mirrored_image[0, :, 0], image[0, :, -1])
    for k, v in vision_pretrain.token_targets(right, 112).items():
        np.testing.assert_array_equal(mirrored[k][0], v)


def test_a_rendered_pool_holds_the_scenes_and_targets_of_its_seeds():
    from viper_common.shapeworld import render
    from viper_common.shapeworld.scene import sample_scene

    seeds = range(1000, 1005)
    images, targets = vision_pretrain.render_pool(56, seeds, workers=1, chunk=2)
    assert images.shape == (5, 56, 56, 3) and images.dtype == np.uint8 and targets["hue"].shape == (5, 4)
    scene = sample_scene(np.random.default_rng(1003))
    np.testing.assert_array_equal(images[3], np.asarray(render.render(scene, 1003, 56)))
    np.testing.assert_array_equal(targets["shape"][3], vision_pretrain.token_targets(scene, 56)["shape"])
