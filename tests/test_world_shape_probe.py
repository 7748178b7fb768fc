"""scripts/world_shape_probe.py: the centred crop holds the object and the token cell is the grid cell that
holds its centre; the MLP readout learns a separable target and stays at chance on a random one."""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import world_shape_probe as probe  # noqa: E402


def test_crops_are_aligned_with_their_objects():
    data = probe.object_crops(4, 52)
    n = len(data["shape"])
    assert n >= 4 and data["cell"].shape == (n, 28 * 28 * 3) and data["crop"].shape == (n, 40 * 40 * 3)
    assert len(data["size"]) == n and set(data["shape"]) <= set(range(len(probe.SHAPES)))
    crops = data["crop"].reshape(n, 40, 40, 3)
    centre, border = crops[:, 17:23, 17:23], np.concatenate([crops[:, :3].reshape(n, -1, 3), crops[:, -3:].reshape(n, -1, 3)], 1)
    # the object's colour sits at the crop's centre: it differs from the crop's border (mostly background)
    assert (np.abs(centre.reshape(n, -1, 3).mean(1) - np.median(border, 1)).max(1) > 0.05).mean() >= 0.75


def test_mlp_accuracy_learns_a_separable_target_and_not_a_random_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(probe.SHAPES), 1200)
    x = rng.normal(size=(1200, 20)).astype(np.float32)
    x[np.arange(1200), labels] += 4.0  # class k raises input k: linearly separable
    sizes = rng.integers(0, 3, 1200)
    separable = probe.mlp_accuracy(x[:1000], labels[:1000], x[1000:], labels[1000:], sizes[1000:], steps=300)
    assert separable["all"] >= 0.95
    noise = rng.integers(0, len(probe.SHAPES), 1200)
    random = probe.mlp_accuracy(x[:1000], noise[:1000], x[1000:], noise[1000:], sizes[1000:], steps=300)
    assert random["all"] <= 0.3  # chance 1/6; 200 held-out rows
