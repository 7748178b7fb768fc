"""`viper world shuffle-truth` (viper_common/shapeworld/controls.py): the shuffled-truth control of issue 18."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from viper_common import records as rec
from viper_common.shapeworld.controls import SUMMARY_NAME, derangement, shuffle_truth


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _write_synth(root, n_caption=5, n_ops=4):
    """A synthesis output folder: one job folder per task, two shards for caption_refine, with manifests."""
    made = {}
    cr = [rec.ViperRecord(id=f"c{i}", task="caption_refine", images=(_png(i),), caption=f"caption {i}.",
                          truth=(f"The circle {i} is red.", f"Fix {i}."), provenance={"source": f"s{i}"})
          for i in range(n_caption)]
    ops = [rec.ViperRecord(id=f"o{i}", task="visual_ops", images=(_png(i), _png(100 + i)),
                           truth=(f"Remove the star {i}.",)) for i in range(n_ops)]
    d = root / "caption_refine-00000-of-00001"
    made[d] = {"part-00000.arrayrecord": rec.write_shard(d / "part-00000.arrayrecord", cr[:3]),
               "part-00001.arrayrecord": rec.write_shard(d / "part-00001.arrayrecord", cr[3:])}
    rec.write_manifest(d, made[d], complete=True, num_rejects=2)
    (d / "part-00000.json").write_text(json.dumps({"ids": ["c0", "c1", "c2"]}))
    d = root / "visual_ops-00000-of-00001"
    made[d] = {"part-00000.arrayrecord": rec.write_shard(d / "part-00000.arrayrecord", ops)}
    rec.write_manifest(d, made[d], complete=True)
    return cr + ops


def _read(root):
    out = {}
    for shard in sorted(root.glob("*/part-*.arrayrecord")):
        for raw in rec.read_shard(shard):
            r = rec.decode(raw)
            out[r.id] = (shard.relative_to(root).as_posix(), r)
    return out


@pytest.mark.parametrize("n", [2, 3, 5, 17, 100])
def test_derangement_has_no_fixed_point(n):
    for seed in range(30):
        perm = derangement(n, np.random.default_rng(seed))
        assert sorted(perm.tolist()) == list(range(n))
        assert all(perm[i] != i for i in range(n))


def test_derangement_of_one_is_identity():
    assert derangement(1, np.random.default_rng(0)).tolist() == [0]


def test_shuffle_truth_permutes_truth_within_task_only(tmp_path):
    src, out = tmp_path / "synth", tmp_path / "shuffled"
    original = {r.id: r for r in _write_synth(src)}
    summary = shuffle_truth(src, out, seed=3)
    before, after = _read(src), _read(out)
    assert set(after) == set(before)
    for rid, (where, r) in after.items():
        o = original[rid]
        assert where == before[rid][0]  # same folder and shard name
        assert (r.task, r.images, r.caption, r.provenance) == (o.task, o.images, o.caption, o.provenance)
        assert r.truth != o.truth  # nobody keeps its own truth
    for task in ("caption_refine", "visual_ops"):
        old = sorted(r.truth for r in original.values() if r.task == task)
        new = sorted(r.truth for _, r in after.values() if r.task == task)
        assert old == new  # a permutation within the task
    assert summary["tasks"]["caption_refine"] == {"records": 5, "unshuffled": 0, "same_content": 0}
    assert summary["tasks"]["visual_ops"]["records"] == 4
    assert json.loads((out / SUMMARY_NAME).read_text())["seed"] == 3


def test_shuffle_truth_manifests_sidecars_and_determinism(tmp_path):
    src = tmp_path / "synth"
    _write_synth(src)
    shuffle_truth(src, tmp_path / "a", seed=1)
    shuffle_truth(src, tmp_path / "b", seed=1)
    a, b = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert {k: v[1].truth for k, v in a.items()} == {k: v[1].truth for k, v in b.items()}
    m = rec.read_manifest(tmp_path / "a" / "caption_refine-00000-of-00001")
    assert m["num_records"] == 5 and m["shards"] == {"part-00000.arrayrecord": 3, "part-00001.arrayrecord": 2}
    assert m["complete"] is True and m["num_rejects"] == 2 and m["shuffled_truth"]["seed"] == 1
    assert (tmp_path / "a" / "caption_refine-00000-of-00001" / "part-00000.json").exists()


def test_single_record_task_is_kept_and_counted(tmp_path):
    src = tmp_path / "synth"
    _write_synth(src, n_caption=5, n_ops=1)
    summary = shuffle_truth(src, tmp_path / "out", seed=0)
    assert summary["tasks"]["visual_ops"] == {"records": 1, "unshuffled": 1, "same_content": 1}


def test_refuses_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        shuffle_truth(tmp_path / "missing", tmp_path / "out", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no part-"):
        shuffle_truth(tmp_path / "empty", tmp_path / "out", 0)
    _write_synth(tmp_path / "synth")
    with pytest.raises(ValueError, match="outside"):
        shuffle_truth(tmp_path / "synth", tmp_path / "synth" / "inner", 0)


def test_cli(tmp_path, capsys):
    from viper_jax.cli import main

    _write_synth(tmp_path / "synth")
    main(["world", "shuffle-truth", "--records", str(tmp_path / "synth"), "--out", str(tmp_path / "out"),
          "--seed", "2"])
    assert "caption_refine: 5 records" in capsys.readouterr().out
    assert len(_read(tmp_path / "out")) == 9
    with pytest.raises(SystemExit, match="no records folder"):
        main(["world", "shuffle-truth", "--records", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
