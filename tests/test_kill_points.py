"""Exact kill points (viper_common/kill_points.py): each command SIGKILLed at a named moment where a crash hurts
(inside a checkpoint save, between a metrics row and its checkpoint, half a metrics line, between a part shard
and its sidecar, inside a shard, inside an HF export, before the tiny model's tokenizer), the state it leaves
checked, then rerun: the result is identical to an uninterrupted run (scripts/crash_scenarios.py's digests:
parameter and optimizer bytes, metrics rows, checkpoint steps, records, sidecars, manifests, export files).
`viper loop` is killed at its own points with stand-in steps (tests/fake_loop_steps.py: a real round takes
minutes here). `scripts/crash_sweep.py` does all this at random moments and random points, for
`viper-synth visual-ops` and real `viper loop` rounds too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import crash_scenarios as cs  # noqa: E402

KILLED = -9  # SIGKILL


def run(root: Path, command: str, out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = cs.env_for(root)
    if kill_at:
        env["VIPER_KILL_AT"] = kill_at
    return subprocess.run(cs.command_line(root, command, out), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def finish(root: Path, command: str, out: Path) -> str:
    done = run(root, command, out)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Inputs shared by the module; `trained` is an uninterrupted `viper train` (the reference for train and
    the checkpoint that convert exports)."""
    root = tmp_path_factory.mktemp("kill_points")
    cs.prepare(root, "convert")
    return root


# ------------------------------------------------------------------------------------------------ the mechanism

_SCRIPT = """
import sys
from viper_common.kill_points import ACTIVE, kill_point
print("active" if ACTIVE else "inactive", flush=True)
for name in sys.argv[1:]:
    kill_point(name)
    print("passed", name, flush=True)
"""


def _points(env: dict, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SCRIPT, *names], env=dict(env, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)


def test_kill_point_kills_on_the_named_hit_and_logs_every_hit(tmp_path):
    env = cs.env_for(tmp_path)
    plain = _points(env, "a", "b", "b")
    assert plain.returncode == 0 and plain.stdout.split("\n")[0] == "inactive"
    log = tmp_path / "hits"
    killed = _points(dict(env, VIPER_KILL_AT="b:2", VIPER_KILL_LOG=str(log)), "a", "b", "a", "b", "c")
    assert killed.returncode == KILLED
    assert killed.stdout.splitlines() == ["active", "passed a", "passed b", "passed a"]
    assert [line.split(" ", 1)[1] for line in log.read_text().splitlines()] == ["a", "b", "a", "b"]
    assert _points(dict(env, VIPER_KILL_AT="b"), "a", "b").stdout.splitlines() == ["active", "passed a"]
    bad = _points(dict(env, VIPER_KILL_AT="b:zero"), "b")
    assert bad.returncode == 1 and "VIPER_KILL_AT='b:zero'" in bad.stderr


# ------------------------------------------------------------------------------------------------ trainers

def test_train_killed_before_the_tiny_tokenizer_then_inside_a_checkpoint_save(root):
    want = cs.digest("train", root / "trained")
    out = root / "train_killed"
    # Before its tokenizer: the tiny model was written in place, and the next start took it for a whole one.
    assert run(root, "train", out, "tiny_model.weights_written:1").returncode == KILLED
    assert not (out / "tiny_model" / "config.json").exists()
    # Inside the (asynchronous) save of step 3, its metrics row already written.
    assert run(root, "train", out, "checkpoint.save_started:2").returncode == KILLED
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "resumed from" in finish(root, "train", out)
    got = cs.digest("train", out)
    assert got["metric_steps"] == [1, 2, 3, 4, 5]  # no step twice, none lost
    assert got == want


def test_sft_killed_in_the_middle_of_a_metrics_line(root):
    cs.prepare(root, "sft")
    ref, out = root / "sft_ref", root / "sft_killed"
    finish(root, "sft", ref)
    assert run(root, "sft", out, "metrics.half_line:5").returncode == KILLED
    last = (out / "metrics.jsonl").read_text().splitlines()[-1]
    with pytest.raises(json.JSONDecodeError):
        json.loads(last)  # half of step 5's row, as a kill inside the write leaves it
    # Step 3's asynchronous save is committed by now, or not yet (then the rerun starts from step 0).
    committed = {p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()}
    assert committed <= {"3"}
    assert ("resumed from" in finish(root, "sft", out)) == bool(committed)
    assert cs.digest("sft", out) == cs.digest("sft", ref)


# ------------------------------------------------------------------------------------------------ synthesis

def test_synthesis_killed_between_a_shard_and_its_sidecar(root):
    """caption-refine; visual-ops commits its parts through the same Job.write_part (the sweep runs both)."""
    cs.prepare(root, "visual-ops")  # stage1: an uninterrupted caption-refine (the reference of this test)
    out = root / "cr_killed"
    assert run(root, "caption-refine", out, "synth.part.shard_committed:2").returncode == KILLED
    job = out / "caption_refine-00000-of-00001"
    assert (job / "part-00001.arrayrecord").exists() and not (job / "part-00001.json").exists()  # an orphan
    finish(root, "caption-refine", out)
    assert cs.digest("caption-refine", out) == cs.digest("caption-refine", root / "stage1") != {}


# ------------------------------------------------------------------------------------------------ export

def test_convert_killed_inside_a_safetensors_file_then_between_files(root):
    ref, out = root / "hf_ref", root / "hf_killed"
    finish(root, "convert", ref)
    assert run(root, "convert", out, "export.tensor_written:20").returncode == KILLED
    left = sorted(p.name for p in out.iterdir())
    assert left and all(".tmp" in n or n.endswith(".safetensors") for n in left)  # no config.json: not a model
    assert run(root, "convert", out, "export.file_written:6").returncode == KILLED
    assert not (out / "config.json").exists()
    finish(root, "convert", out)
    assert cs.digest("convert", out) == cs.digest("convert", ref)


# ------------------------------------------------------------------------------------------------ viper loop

def _loop(work: Path, images: Path, log: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    fake = f"{sys.executable} {ROOT / 'tests' / 'fake_loop_steps.py'}"
    env = dict(cs.env_for(work), FAKE_STEPS_LOG=str(log))
    if kill_at:
        env["VIPER_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "viper_jax", "loop", "--config", str(ROOT / "configs/loop_tiny.py"), "--workdir",
           str(work), "--images", str(images), "--quiet", "--config.models.tiny=False",
           f"--config.models.vlm={images}", f"--config.synth.command={fake}", f"--config.train.command={fake}"]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_loop_killed_at_its_status_writes_and_before_the_export_rename(tmp_path):
    """The loop's own bookkeeping (its steps are stand-ins: tests/fake_loop_steps.py): killed right after a
    step is marked done, right after one is marked running, and with the export converted but not renamed, each
    rerun goes on from there: no finished step redone, the unfinished one redone, the same round at the end."""
    images = tmp_path / "images"
    images.mkdir()
    ref_log, log = tmp_path / "ref.log", tmp_path / "steps.log"
    assert _loop(tmp_path / "ref", images, ref_log).returncode == 0
    assert ref_log.read_text().split() == ["caption-refine", "visual-ops", "train", "convert"]

    work = tmp_path / "work"
    # A run's status.json writes: its start, then "running" and "done" of each step it does.
    assert _loop(work, images, log, "loop.status_written:3").returncode == KILLED  # caption-refine done
    assert log.read_text().split() == ["caption-refine"]
    assert _loop(work, images, log, "loop.status_written:4").returncode == KILLED  # visual-ops done, train running
    assert log.read_text().split() == ["caption-refine", "visual-ops"]
    assert _loop(work, images, log, "loop.export_converted:1").returncode == KILLED
    assert not (work / "round_000" / "export").exists()
    done = _loop(work, images, log)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # Nothing finished is redone; the export, killed before its rename, is.
    assert log.read_text().split() == ["caption-refine", "visual-ops", "train", "convert", "convert"]

    def round_state(w: Path) -> dict:
        status = json.loads((w / "round_000" / "status.json").read_text())
        export = w / "round_000" / "export"
        return {"state": status["state"], "steps": {k: v["state"] for k, v in status["steps"].items()},
                "export": sorted(p.name for p in export.iterdir()), "leftovers": sorted(
                    str(p.relative_to(w)) for p in w.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial"))}

    assert round_state(work) == round_state(tmp_path / "ref")
    assert round_state(work)["state"] == "done" and round_state(work)["leftovers"] == []
