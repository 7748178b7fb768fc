"""scripts/world_truth_probe.py on a real shard: truth that states the image's facts is counted consistent and
right per field, truth about another object is not, and an oracle describing the image hits only a truth that
says what the image shows."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from viper_common import records
from viper_common.shapeworld import render
from viper_common.shapeworld.scene import Obj, Scene

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import world_truth_probe as probe  # noqa: E402

RED_SQUARE = Obj(shape="square", hue="red", shade="dark", size="large", pattern="solid", label="", cell=0)
SCENE = Scene("white", (RED_SQUARE, dataclasses.replace(RED_SQUARE, shape="circle", hue="blue", cell=8)))


def test_agreement_per_sentence_and_field():
    tally = probe.Tally()
    tally.add("The red square in the top left corner has become a circle.", SCENE)  # right object, either shape
    tally.add("The green star in the top left corner is missing.", SCENE)  # a wrong hue and a wrong shape
    tally.add("Nothing here.", SCENE)  # no facts: not counted
    assert tally.agree == [True, False]
    assert tally.fields["hue"] == [True, False] and tally.fields["shape"] == [True, False]
    assert not tally.fields["size"]
    row = tally.row("truth")
    assert row.startswith("| truth | 2 | 3.5 | 50% | 50% (n=2) | 50% (n=2) | - |"), row


def test_probe_reads_a_shard_and_scores_the_ceilings(tmp_path):
    image = render.render_png(SCENE, seed=7, size=112)
    shard = tmp_path / "synth" / "caption_refine-00000-of-00001"
    shard.mkdir(parents=True)
    right = records.ViperRecord("r0", "caption_refine", (image,), ("A large dark red solid square is at the top "
                                                                  "left.",), caption="A square.")
    wrong = records.ViperRecord("r1", "caption_refine", (image,), ("The green star at the bottom has become a "
                                                                  "cross.",), caption="A star.")
    records.write_shard(shard / "part-00000.arrayrecord", [right, wrong])
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "world_truth_probe.py"), "--synth",
                           str(tmp_path / "synth")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {cols[0]: cols[1:] for line in done.stdout.splitlines() if line.startswith("| ")
            for cols in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows["truth"][:3] == ["2", "5.0", "50%"], done.stdout  # 6 and 4 facts; r1 names no object there
    assert rows["truth"][3:5] == ["50% (n=2)", "50% (n=2)"], done.stdout
    assert rows["the truth itself"][:2] == ["1.000", "100%"], done.stdout
    # the oracle's sentence about the red square states r0's every fact: a hit on r0 only, and r0's precision
    # is that sentence's share of the answer's characters (the blue circle's sentence misses)
    correctness, with_hit, _ = rows["oracle: one sentence per true object"]
    assert with_hit == "50%" and 0.0 < float(correctness) < 0.5, done.stdout
    assert rows["the caption, copied"][:2] == ["0.000", "0%"], done.stdout


def test_probe_names_a_dir_without_shards(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "world_truth_probe.py"), "--synth",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and str(tmp_path) in done.stderr and "Traceback" not in done.stderr
