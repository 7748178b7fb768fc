"""`viper world images`: unlabelled synthesis sources from the synth seed range, each carrying its scene."""

import subprocess
import sys

from viper_common.shapeworld import render
from viper_common.shapeworld.splits import SEED_RANGES, seed_block


def test_images_come_from_their_synth_block_and_carry_their_scene(tmp_path):
    cmd = [sys.executable, "-m", "viper_jax", "world", "images", "--out", str(tmp_path), "--n", "3", "--block", "2"]
    subprocess.run(cmd, check=True, capture_output=True)
    files = sorted(tmp_path.glob("*.png"))
    want = seed_block("synth", 2, 3)
    assert [f.name for f in files] == [f"synth-{s}.png" for s in want]
    for f in files:
        data = f.read_bytes()
        assert render.read_seed(data) in SEED_RANGES["synth"]
        assert render.read_scene(data) is not None and len(render.read_scene(data).objects) >= 1
    before = files[0].stat().st_mtime_ns
    subprocess.run(cmd, check=True, capture_output=True)  # a rerun keeps what is there
    assert files[0].stat().st_mtime_ns == before
    bad = subprocess.run(cmd[:-1] + ["-1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "--block" in bad.stderr
