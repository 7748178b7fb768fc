"""`viper loop` for one round with tiny models (configs/loop_tiny.py, 2 photos, 1 GRPO step per stage):
interrupted by SIGINT once training has started, resumed without re-synthesising, then a third run that
does nothing; every artifact exists and loads. Plus the wait-for-shards mode, the demo's inputs and its
report writer on the same round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from viper_jax import loop
from viper_jax.loop import demo

REPO = Path(__file__).resolve().parents[1]
# The round_one fixture runs one real round, three times (~4 min on two shared cores: two XLA compiles of the
# GRPO update dominate); every test using it is marked slow.
slow = pytest.mark.slow

TRAIN_OVERRIDES = ("--config.stages.caption_refine.steps=1", "--config.stages.visual_ops.steps=1")


def loop_args(work: Path, images: Path) -> list[str]:
    return ["--config", str(REPO / "configs/loop_tiny.py"), "--workdir", str(work), "--images", str(images),
            "--quiet", f"--config.train.overrides={tuple(loop.load_config(REPO / 'configs/loop_tiny.py').train.overrides) + TRAIN_OVERRIDES!r}"]


def status(work: Path) -> dict:
    path = work / "round_000" / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _default_sigint() -> None:
    """In the forked child before exec: SIGINT handled by default and not blocked (exec keeps both settings)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def round_one(tmp_path_factory):
    """(work, images, facts) after: run 1 (SIGINT during train), run 2 (resume), run 3 (no-op)."""
    root = tmp_path_factory.mktemp("loop")
    work, images = root / "work", root / "images"
    made = demo.prepare_images(images, 2)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "viper_jax", "loop", *loop_args(work, images)]
    facts: dict = {"images": made}

    # Run 1: interrupted (SIGINT, as Ctrl-C) as soon as training has started. In CI (an xdist worker that had run
    # other test files) the loop trained to the end through every SIGINT: it had inherited SIGINT ignored or
    # blocked. The child starts as from a shell prompt instead, SIGINT at its default and unblocked; and, as a
    # user would, the test presses Ctrl-C again while training still shows as running, recording how often.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_default_sigint)
    deadline, sent = time.time() + 600, 0
    while proc.poll() is None and time.time() < deadline:
        if status(work).get("steps", {}).get("train", {}).get("state") == "running":
            proc.send_signal(signal.SIGINT)
            sent += 1
            try:
                proc.wait(timeout=45)  # the loop gives its child 30 s to stop
            except subprocess.TimeoutExpired:
                continue
        time.sleep(0.2)
    out = proc.communicate(timeout=120)[0].decode()
    facts["run1"] = {"code": proc.returncode, "output": out, "status": status(work), "sigints": sent}
    synth = work / "round_000" / "synth"
    facts["manifest_mtimes"] = {p: p.stat().st_mtime_ns for p in synth.glob("*/manifest.json")}

    # Run 2: resumes; run 3: has nothing left to do.
    for name in ("run2", "run3"):
        start = time.time()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        facts[name] = {"code": done.returncode, "output": done.stdout + done.stderr, "status": status(work),
                       "seconds": time.time() - start, "train_log": (work / "round_000/logs/train.log").stat().st_size,
                       "files": {str(p.relative_to(work)): (p.stat().st_size, p.stat().st_mtime_ns)
                                 for p in work.rglob("*") if p.is_file()}}
    return work, images, facts


@slow
def test_interrupt_then_resume_without_resynthesis(round_one):
    work, _, facts = round_one
    run1 = facts["run1"]
    assert run1["code"] != 0 and "interrupted" in run1["output"], run1["output"][-3000:]
    steps1 = run1["status"]["steps"]
    assert steps1["synth_caption_refine"]["state"] == steps1["synth_visual_ops"]["state"] == "done"
    assert steps1["train"]["state"] == "interrupted" and "export" not in steps1

    run2 = facts["run2"]
    assert run2["code"] == 0, run2["output"][-3000:]
    assert "synth_caption_refine already done, skipped" in run2["output"]
    steps2 = run2["status"]["steps"]
    assert run2["status"]["state"] == "done" and all(steps2[s]["state"] == "done" for s in loop.STEPS)
    for s in ("synth_caption_refine", "synth_visual_ops"):  # untouched by the resume
        assert steps2[s] == steps1[s]
    for path, mtime in facts["manifest_mtimes"].items():
        assert path.stat().st_mtime_ns == mtime
    assert len(facts["manifest_mtimes"]) == 2


@slow
def test_second_invocation_does_nothing(round_one):
    _, _, facts = round_one
    run3 = facts["run3"]
    assert run3["code"] == 0, run3["output"][-3000:]
    assert run3["output"].count("already done, skipped") == len(loop.STEPS)
    assert run3["status"] == facts["run2"]["status"]
    assert run3["train_log"] == facts["run2"]["train_log"]  # no subprocess ran
    # Nothing was redone: no file appeared, went or changed, but the loop's own config and status records.
    rewritten = {"loop_config.json", "round_000/status.json"}
    before, after = facts["run2"]["files"], run3["files"]
    assert before.keys() == after.keys(), sorted(before.keys() ^ after.keys())
    changed = sorted(k for k in before if before[k] != after[k] and k not in rewritten)
    assert not changed, changed
    assert any(k.startswith("round_000/train/checkpoints/") for k in before)  # not vacuous


@slow
def test_artifacts_exist_and_load(round_one):
    from viper_common import records

    work, images, facts = round_one
    rd = work / "round_000"
    steps = facts["run2"]["status"]["steps"]
    # Records: one per input image and task, decoding under the record contract.
    for task, n_images in (("caption_refine", 1), ("visual_ops", 2)):
        recs = [records.decode(raw) for shard in sorted((rd / "synth").glob(f"{task}-*/part-*.arrayrecord"))
                for raw in records.read_shard(shard)]
        assert len(recs) == 2 == steps[f"synth_{task}"]["num_records"]
        assert all(r.task == task and len(r.images) == n_images and r.truth for r in recs)
        assert {Path(r.provenance["source"]).name for r in recs} == {m["file"] for m in facts["images"]}
        assert all(r.provenance["models"]["vlm"] == str(work / "tiny_models" / "vlm") for r in recs)
    # Training: both stages ran, one step each, and the Orbax checkpoint restores.
    metrics = [json.loads(x) for x in (rd / "train/metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["stage"]) for m in metrics] == [(1, "caption_refine"), (2, "visual_ops")]
    from flax import nnx

    from viper_jax import checkpoint
    from viper_jax.convert import load_model

    ckpt = Path(steps["train"]["checkpoints"])
    assert checkpoint.latest_step(ckpt) == 2
    trained = nnx.to_pure_dict(nnx.state(load_model(ckpt), nnx.Param))
    # Export: transformers loads it (model and tokenizer); its weights are the checkpoint's, bit for bit.
    export = Path(steps["export"]["hf_dir"])
    assert export == rd / "export" and not (rd / "export.partial").exists()
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(export))
    assert AutoTokenizer.from_pretrained(str(export)).convert_tokens_to_ids("<|im_end|>") == hf.config.text_config.eos_token_id
    exported = nnx.to_pure_dict(nnx.state(load_model(export), nnx.Param))
    import jax

    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The export is what round 1 would synthesise with (and train from).
    config = loop.load_config(REPO / "configs/loop_tiny.py")
    config.workdir, config.images = str(work), str(images)
    assert loop.Loop(config, say=lambda _: None)._models(1)["vlm"] == str(export)


@slow
def test_wait_for_shards(round_one, tmp_path):
    """Wait mode writes the job's commands, times out without shards, and accepts complete ones."""
    import shutil

    work, images, _ = round_one
    config = loop.load_config(REPO / "configs/loop_tiny.py")
    config.workdir, config.images = str(tmp_path), str(images)
    config.synth.mode, config.synth.wait_timeout_s, config.synth.poll_s = "wait", 0.5, 0.1
    config.models.vlm = str(work / "tiny_models" / "vlm")
    config.models.tiny = False
    lp = loop.Loop(config, say=lambda _: None)
    rd = tmp_path / "round_000"
    models = lp._models(0)
    with pytest.raises(TimeoutError, match="no complete caption_refine shards"):
        lp._synth("caption_refine", rd, models, 0)
    request = json.loads((rd / "synth" / "REQUEST.json").read_text())
    assert "caption-refine" in request["caption_refine"][0] and models["vlm"] in request["caption_refine"][0]
    src = work / "round_000" / "synth" / "caption_refine-00000-of-00001"
    shutil.copytree(src, rd / "synth" / src.name)
    state = lp._synth("caption_refine", rd, models, 0)
    assert {k: state[k] for k in ("num_shards", "complete", "num_records", "num_rejects")} == {
        "num_shards": 1, "complete": 1, "num_records": 2, "num_rejects": 0}
    assert "caption-refine" in state["commands"][0]


@slow
def test_demo_inputs_and_report(round_one, tmp_path):
    work, _, facts = round_one
    made = demo.prepare_images(tmp_path / "images", 7)  # more than the photos: extra crops
    from PIL import Image

    assert len(made) == 7 and len({m["file"] for m in made}) == 7
    assert all(Image.open(tmp_path / "images" / m["file"]).size == (demo.SIZE, demo.SIZE) for m in made)
    assert all(m["licence"] and m["title"] for m in made)
    (tmp_path / "demo").mkdir()
    os.symlink(work, tmp_path / "demo" / "loop")
    report = demo.write_report(tmp_path / "demo", facts["images"], started=time.time(), pairs=1, echo=lambda _: None)
    text = report.read_text()
    assets = tmp_path / "demo" / "assets"
    for name in ("rewards.png", "csr_0.png", "vop_0.png", "reconstruction_0.png"):
        assert (assets / name).stat().st_size > 0, name  # every asset written, the reconstruction too
        assert f"assets/{name}" in text or name == "reconstruction_0.png", name  # shown inside csr_0.png
    assert "restored with viper_jax.convert.load_model: step 2" in text
    assert "loaded with transformers" in text and "FAILED" not in text


def test_7b_config_commands(tmp_path):
    """configs/loop_7b.py: eight parallel synthesis shards with the Instruct model in round 0, the round-0
    export in round 1; training from the same model on that round's shards."""
    config = loop.load_config(REPO / "configs/loop_7b.py", ["--config.workdir=" + str(tmp_path), "--config.images=/data/u"])
    lp = loop.Loop(config, say=lambda _: None)
    assert lp._models(0)["vlm"] == "/models/Qwen2.5-VL-7B-Instruct"
    models = lp._models(1)
    assert models["vlm"] == str(tmp_path / "round_000" / "export") and models["t2i"] == "/models/Qwen-Image"
    cmds = lp._synth_commands("visual_ops", tmp_path / "round_001", models, 1)
    assert len(cmds) == 8 and cmds[3][-2:] == ["--shard_index=3", "--num_shards=8"]
    assert f"--config.models.vlm={models['vlm']}" in cmds[0] and "--config.models.editor=/models/Qwen-Image-Edit" in cmds[0]
    assert cmds[0][cmds[0].index("--records") + 1] == str(tmp_path / "round_001" / "synth")
    with pytest.raises(Exception, match="unknown config key"):
        loop.load_config(REPO / "configs/loop_7b.py", ["--config.synth.num_shard=2"])


FAKE_SYNTH = '''
import json, os, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[2:] if a.startswith("--") and "=" in a)
argv = sys.argv[1:]
out = Path(argv[argv.index("--out") + 1])
task = argv[0].replace("-", "_")
i, n = int(args.get("--shard_index", 0)), int(args.get("--num_shards", 1))
job = out / f"{task}-{i:05d}-of-{n:05d}"
job.mkdir(parents=True, exist_ok=True)
(job / "manifest.json").write_text(json.dumps({"complete": True, "num_records": 2, "num_rejects": 1,
                                               "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")) if i == 1 else 0)
'''


def test_parallel_synthesis_shards(tmp_path, monkeypatch):
    """synth.num_shards job shards run at once, shard i on devices[i]; a failing shard fails the step."""
    script = tmp_path / "fake_synth.py"
    script.write_text(FAKE_SYNTH)
    config = loop.load_config(REPO / "configs/loop_7b.py", [
        f"--config.workdir={tmp_path / 'work'}", f"--config.images={tmp_path}", "--config.synth.num_shards=3",
        "--config.synth.devices=4,5", f"--config.synth.command={sys.executable} {script}"])
    lp = loop.Loop(config, say=lambda _: None)
    rd = tmp_path / "work" / "round_000"
    state = lp._synth("caption_refine", rd, lp._models(0), 0)
    assert {k: state[k] for k in ("num_shards", "complete", "num_records", "num_rejects")} == {
        "num_shards": 3, "complete": 3, "num_records": 6, "num_rejects": 3}
    gpus = [json.loads((rd / "synth" / f"caption_refine-{i:05d}-of-00003" / "manifest.json").read_text())["gpu"]
            for i in range(3)]
    assert gpus == ["4", "5", "4"]
    monkeypatch.setenv("FAKE_EXIT", "7")
    with pytest.raises(loop.StepFailed, match="status 7"):
        lp._synth("visual_ops", rd, lp._models(0), 0)


_EMPTY_STAGE_STEPS = '''
import json, sys
from pathlib import Path
argv = sys.argv[1:]
arg = lambda flag: argv[argv.index(flag) + 1]
with open(sys.argv[0] + ".log", "a") as log:
    log.write(json.dumps(argv) + "\\n")
if argv[0] in ("caption-refine", "visual-ops"):
    task = argv[0].replace("-", "_")
    job = Path(arg("--out")) / f"{task}-00000-of-00001"
    job.mkdir(parents=True, exist_ok=True)
    n = 0 if task == "visual_ops" else 2  # the synthesiser cannot make stage 2's data
    (job / "manifest.json").write_text(json.dumps({"complete": True, "num_records": n, "num_rejects": 3 - n}))
elif argv[0] == "train":
    work = Path(arg("--workdir"))
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    (work / "metrics.jsonl").write_text(json.dumps({"step": 1, "stage": "caption_refine"}) + "\\n")
else:  # convert
    Path(arg("--out")).mkdir(parents=True, exist_ok=True)
'''


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_empty_stage_stops_or_is_skipped_in_training(tmp_path, mode):
    """A stage whose synthesis made no records stops the loop (default) or, with empty_stage=skip, is left out of
    that round's stage_order; the round then finishes and its status says which stage was skipped."""
    script = tmp_path / "steps.py"
    script.write_text(_EMPTY_STAGE_STEPS)
    images = tmp_path / "images"
    images.mkdir()
    cmd = [sys.executable, "-m", "viper_jax", "loop", "--config", str(REPO / "configs/loop_tiny.py"), "--workdir",
           str(tmp_path / "work"), "--images", str(images), "--quiet", "--config.models.tiny=False",
           f"--config.models.vlm={images}", f"--config.synth.command={sys.executable} {script}",
           f"--config.train.command={sys.executable} {script}", f"--config.empty_stage={mode}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    calls = [json.loads(line) for line in Path(str(script) + ".log").read_text().splitlines()]
    status = json.loads((tmp_path / "work" / "round_000" / "status.json").read_text())
    if mode == "stop":
        assert proc.returncode != 0 and "visual_ops synthesis made no records (rejects: 3)" in proc.stderr + proc.stdout
        assert [c[0] for c in calls] == ["caption-refine", "visual-ops"]  # nothing trained
        return
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in calls] == ["caption-refine", "visual-ops", "train", "convert"]
    train = calls[2]
    assert "--config.stage_order=('caption_refine',)" in train
    assert status["steps"]["synth_visual_ops"]["skipped_in_training"] is True and status["state"] == "done"
