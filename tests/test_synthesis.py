"""synthesis_torch: both stages end to end with tiny random-init models loaded by path, resume after a crash
and after a kill, the job split, bad inputs, parsing/filtering on fixed outputs, hard-entity rules and the
difference band. Runs on the CPU in well under two minutes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("diffusers")

from synthesis_torch import caption_refine, diffband, inputs, parsing, visual_ops  # noqa: E402
from synthesis_torch.config import apply_overrides, default_config, load_config, tiny_config  # noqa: E402
from synthesis_torch.entities import extract_entities, select_entities  # noqa: E402
from synthesis_torch.jobs import job_dir_name  # noqa: E402
from viper_common import records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOOD = ("a.jpg", "b.png", "sub/c.webp", "d.jpeg")
BAD = {"broken.jpg": "unreadable", "truncated.png": "unreadable", "tiny.png": "too_small", "huge.png": "too_large"}
MAX_PIXELS = 30_000  # "huge" for the tests: huge.png is 200x200


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A photo-like picture: colour gradients plus a few filled shapes."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 255 * r.uniform(0.5, 1.0, 3)
    image = Image.fromarray(base.astype("uint8"))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(r.integers(0, w // 2)), int(r.integers(0, h // 2))
        draw.ellipse([x0, y0, x0 + w // 4, y0 + h // 4], fill=tuple(int(v) for v in r.integers(0, 255, 3)))
    return image


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from synthesis_torch.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    photo(96, 64, 0).save(root / "a.jpg", quality=90)
    photo(64, 80, 1).save(root / "b.png")
    photo(72, 72, 2).save(root / "sub/c.webp")
    photo(80, 56, 3).save(root / "d.jpeg", format="JPEG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    buf = io.BytesIO()
    photo(64, 64, 4).save(buf, format="PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    photo(12, 12, 5).save(root / "tiny.png")
    photo(200, 200, 6).save(root / "huge.png")
    (root / "notes.txt").write_text("not an image: ignored by extension")
    return root


def make_config(dirs, **changes):
    c = tiny_config(dirs["vlm"], dirs["t2i"], dirs["editor"])
    c.inputs.max_pixels = MAX_PIXELS
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def refiner(tiny_dirs):
    return caption_refine.CaptionRefiner(make_config(tiny_dirs))


@pytest.fixture(scope="module")
def stage1(tiny_dirs, image_dir, refiner, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    manifest = caption_refine.run(make_config(tiny_dirs), image_dir, out, refiner=refiner)
    return out, manifest


def all_records(job_dir: Path) -> list[records.ViperRecord]:
    return [records.decode(raw) for shard in sorted(job_dir.glob("*.arrayrecord")) for raw in records.read_shard(shard)]


def outcomes(job_dir: Path) -> list[str]:
    """Every input key with an outcome (record or reject), from the committed sidecars."""
    return [k for part in sorted(job_dir.glob("part-*.json")) for k in json.loads(part.read_text())["keys"]]


# ---------------------------------------------------------------------------------------------- stage 1
def test_caption_refine_end_to_end(stage1, image_dir):
    out, manifest = stage1
    job = out / job_dir_name("caption_refine", 0, 1)
    assert manifest["complete"] and manifest["num_inputs"] == len(GOOD) + len(BAD)
    assert manifest["num_records"] == len(GOOD) and manifest["num_rejects"] == len(BAD)
    assert manifest["rejects_by_reason"] == {"unreadable": 2, "too_small": 1, "too_large": 1}
    assert {r["source"]: r["reason"] for r in manifest["rejects"]} == BAD  # path and reason of each skip
    assert manifest["models"]["vlm"].endswith("vlm") and "settings" in manifest
    recs = all_records(job)
    assert sorted(r.provenance["source_rel"] for r in recs) == sorted(GOOD)
    assert len({r.id for r in recs}) == len(recs)
    for r in recs:
        assert r.task == "caption_refine" and r.caption and r.truth
        assert r.images[0] == (image_dir / r.provenance["source_rel"]).read_bytes()  # verbatim bytes
        # vlm.rewrite_refined (default): the VLM's own rewrite of caption + corrections (lenient: any text).
        if r.provenance["refined_by"] == "vlm":
            assert r.provenance["refined_description"] == parsing.clean_caption(r.provenance["raw_refine"])
        else:
            assert r.provenance["refined_description"] == parsing.refined_description(r.caption, r.truth)
        assert r.provenance["lenient"] is True and r.provenance["seeds"]["t2i"] >= 0
    # The job manifest lists every part shard with its record count.
    assert sum(manifest["shards"].values()) == len(recs)
    appended = sum(r.provenance["refined_by"] == "appended" for r in recs)
    assert manifest["dropped_by_reason"].get("refine_fallback", 0) == appended


def test_strict_parsing_flow_with_fixed_outputs(tiny_dirs, image_dir, refiner, tmp_path):
    """Stage 1 with the real tiny reconstructor but fixed VLM texts, strict filtering: the critique's
    duplicate and 'no errors' lines are dropped and counted."""
    cfg = make_config(tiny_dirs, filter__lenient=False)
    fake = FakeVLM(cfg)
    stage = caption_refine.CaptionRefiner(cfg, vlm=fake, reconstructor=refiner.recon)
    manifest = caption_refine.run(cfg, image_dir, tmp_path, refiner=stage)
    recs = all_records(tmp_path / job_dir_name("caption_refine", 0, 1))
    assert len(recs) == len(GOOD)
    assert recs[0].truth == ("The car is red, not blue.",
                             'A small wooden sign that reads "OPEN" stands next to the door.')
    n = len(GOOD)  # per critique: the heading, the repeated line and "No other errors." are dropped
    assert manifest["dropped_by_reason"] == {"too_short": n, "duplicate": n, "no_error_statement": n}


# ---------------------------------------------------------------------------------------------- stage 2
def test_visual_ops_end_to_end(stage1, refiner, tiny_dirs, tmp_path):
    out1, _ = stage1
    cfg = make_config(tiny_dirs)
    synth = visual_ops.OpsSynthesizer(cfg, vlm=refiner.vlm)
    manifest = visual_ops.run(cfg, [out1], tmp_path, synthesizer=synth)
    assert manifest["complete"] and manifest["num_inputs"] == len(GOOD) and manifest["num_records"] == len(GOOD)
    stage1_recs = {r.provenance["image_key"]: r for r in all_records(out1 / job_dir_name("caption_refine", 0, 1))}
    for r in all_records(tmp_path / job_dir_name("visual_ops", 0, 1)):
        assert r.task == "visual_ops" and len(r.images) == 2 and r.truth
        assert r.images[0] == stage1_recs[r.provenance["image_key"]].images[0]
        assert records.image_format(r.images[1]) == "png"
        assert r.provenance["ops"][0]["type"] == "unspecified"  # lenient mode on gibberish
        assert r.provenance["entity_names"] == ["the main object"]  # gibberish has no noun phrases
        assert 0.0 <= r.provenance["changed_fraction"] <= 1.0


class FakeVLM:
    """Fixed, well-formed model outputs keyed on which synthesis prompt is asked (every prompt text kept)."""

    path = "fake-vlm"
    REFINED = ('<think>I apply the corrections.</think><answer>A red car is parked next to a small wooden sign that '
               'reads "OPEN". A tall green metal lamp stands behind the car. Two black dogs sit on the grass.</answer>')

    def __init__(self, cfg, edits: str = "", refined: str = REFINED, verify: str = "Yes."):
        self.prompts = cfg.prompts
        self.edits, self.refined, self.verify = edits, refined, verify
        self.asked: list[str] = []

    def generate(self, prompts, batch_size, seeds, **kwargs):
        out = []
        for images, text in prompts:
            self.asked.append(text)
            if text == self.prompts.caption:
                out.append("A red car is parked next to a small wooden sign. Two black dogs sit on the grass.")
            elif text.startswith(self.prompts.critique[:40]):
                out.append('Corrections:\n- The car is red, not blue.\n* the car is red, NOT blue\n'
                           '2. A small wooden sign that reads "OPEN" stands next to the door.\n- No other errors.')
            elif text.startswith(self.prompts.refine.split("{")[0]):
                assert len(images) == 1  # the original image, shown with the caption and its corrections
                out.append(self.refined)
            elif text.startswith(self.prompts.verify_edit.split("{")[0]):
                assert len(images) == 2  # before and after the edit
                out.append(self.verify)
            else:
                out.append(self.edits)
        return out


@pytest.mark.parametrize("mode", ["rewrite", "appended", "fallback"])
def test_refined_description_is_the_vlms_rewrite_and_stage_2_reads_it(tiny_dirs, image_dir, refiner, tmp_path, mode):
    """vlm.rewrite_refined (default): the VLM, shown the image, rewrites the caption with the corrections it found
    into one description; stage 2 picks its hard entities from it (the lamp exists only in the rewrite). Off: the
    caption with the corrections appended. An unusable rewrite falls back to that, counted."""
    cfg = make_config(tiny_dirs, filter__lenient=False, ops__fallback_entities="", diff__min=0.002, diff__max=0.7)
    assert cfg.vlm.rewrite_refined is True  # the default
    cfg.vlm.rewrite_refined = mode != "appended"
    fake = FakeVLM(cfg, refined="Too short." if mode == "fallback" else FakeVLM.REFINED)
    stage1 = caption_refine.CaptionRefiner(cfg, vlm=fake, reconstructor=refiner.recon)
    m1 = caption_refine.run(cfg, image_dir, tmp_path / "s1", refiner=stage1)
    refine_asked = [t for t in fake.asked if t.startswith(cfg.prompts.refine.split("{")[0])]
    assert len(refine_asked) == (0 if mode == "appended" else len(GOOD))
    if refine_asked:
        assert ('"A red car is parked next to a small wooden sign. Two black dogs sit on the grass."' in refine_asked[0]
                and '- The car is red, not blue.\n- A small wooden sign that reads "OPEN" stands next to the door.'
                in refine_asked[0])
    rewrite = ('A red car is parked next to a small wooden sign that reads "OPEN". A tall green metal lamp stands '
               'behind the car. Two black dogs sit on the grass.')
    recs = all_records(tmp_path / "s1" / job_dir_name("caption_refine", 0, 1))
    assert len(recs) == len(GOOD)
    for r in recs:
        appended = parsing.refined_description(r.caption, r.truth)
        expected = rewrite if mode == "rewrite" else appended
        assert r.provenance["refined_description"] == expected
        assert r.provenance["refined_by"] == ("vlm" if mode == "rewrite" else "appended")
    assert m1["dropped_by_reason"].get("refine_fallback", 0) == (len(GOOD) if mode == "fallback" else 0)

    synth = visual_ops.OpsSynthesizer(cfg, vlm=FakeVLM(cfg, "attribute: Change the red car to blue."),
                                      editor=FakeEditor())
    visual_ops.run(cfg, [tmp_path / "s1"], tmp_path / "s2", synthesizer=synth)
    recs2 = all_records(tmp_path / "s2" / job_dir_name("visual_ops", 0, 1))
    assert len(recs2) == len(GOOD)
    for r in recs2:
        phrases = [e["phrase"] for e in r.provenance["entities"]]
        assert r.provenance["description"] == (rewrite if mode == "rewrite" else appended)
        assert r.provenance["description_by"] == ("vlm" if mode == "rewrite" else "appended")
        assert ("a tall green metal lamp" in phrases) == (mode == "rewrite")
        assert ("a tall green metal lamp" in r.provenance["entity_names"]) == (mode == "rewrite")


class FakeEditor:
    """Deterministic stand-in editor: 'nothing' -> unchanged, 'everything' -> negative, else a small patch."""

    name = "fake"

    def settings(self):
        return {"name": self.name}

    def edit(self, image, instruction, seed):
        if "nothing" in instruction:
            return image.copy()
        if "everything" in instruction:
            return ImageOps.invert(image)
        edited = image.copy()
        w, h = edited.size
        ImageDraw.Draw(edited).rectangle([w // 4, h // 4, w // 2, h // 2], fill=(0, 0, 255))
        return edited


def test_visual_ops_band_and_strict_ops(tiny_dirs, image_dir, refiner, tmp_path):
    cfg = make_config(tiny_dirs, filter__lenient=False, ops__num_ops=3, ops__fallback_entities="",
                      diff__min=0.002, diff__max=0.7)
    stage1 = caption_refine.CaptionRefiner(cfg, vlm=FakeVLM(cfg), reconstructor=refiner.recon)
    caption_refine.run(cfg, image_dir, tmp_path / "s1", refiner=stage1)
    edits = ("attribute: Change the red car to blue.\nremove: Remove nothing from the small wooden sign.\n"
             "style - make it look like a painting\nattribute: change the red car to blue")
    synth = visual_ops.OpsSynthesizer(cfg, vlm=FakeVLM(cfg, edits), editor=FakeEditor())
    manifest = visual_ops.run(cfg, [tmp_path / "s1"], tmp_path / "s2", synthesizer=synth)
    recs = all_records(tmp_path / "s2" / job_dir_name("visual_ops", 0, 1))
    assert len(recs) == len(GOOD)
    for r in recs:
        assert r.truth == ("Change the red car to blue.",)  # the no-change op is dropped from the truth
        assert [op["kept"] for op in r.provenance["ops"]] == [True, False]
        assert any("sign" in e["phrase"] for e in r.provenance["entities"])
    assert manifest["dropped_by_reason"] == {"op_no_change": 4, "unknown_type": 4, "duplicate": 4}

    blowup = visual_ops.OpsSynthesizer(cfg, vlm=FakeVLM(cfg, "replace: Replace everything with a forest."),
                                       editor=FakeEditor())
    manifest = visual_ops.run(cfg, [tmp_path / "s1"], tmp_path / "s3", synthesizer=blowup)
    assert manifest["num_records"] == 0 and manifest["rejects_by_reason"] == {"edit_too_large": len(GOOD)}
    nothing = visual_ops.OpsSynthesizer(cfg, vlm=FakeVLM(cfg, "text: Change nothing on the sign."),
                                        editor=FakeEditor())
    manifest = visual_ops.run(cfg, [tmp_path / "s1"], tmp_path / "s4", synthesizer=nothing)
    assert manifest["rejects_by_reason"] == {"edit_no_change": len(GOOD)}


@pytest.mark.parametrize("mode,answer,expect", [("sequential", "<think>It is blue now.</think><answer>Yes</answer>", "kept"),
                                                ("sequential", "No, the car is still red.", "edit_not_verified"),
                                                ("sequential", "maybe", "edit_not_verified"),
                                                ("combined", "Yes.", "kept"), ("combined", "NO.", "edit_not_verified")])
def test_edit_check_by_the_vlm(tiny_dirs, image_dir, refiner, tmp_path, mode, answer, expect):
    """ops.verify: the VLM is shown the image before and after each edit that passed the band and asked whether
    it shows the instruction's result; anything but yes denies it (dropped, then the sample rejected, counted)."""
    cfg = make_config(tiny_dirs, filter__lenient=False, ops__fallback_entities="", diff__min=0.002, diff__max=0.7,
                      editor__mode=mode, ops__verify=True)
    assert default_config().ops.verify is False  # off by default: on in configs/synth_shapeworld.py
    caption_refine.run(cfg, image_dir, tmp_path / "s1",
                       refiner=caption_refine.CaptionRefiner(cfg, vlm=FakeVLM(cfg), reconstructor=refiner.recon))
    vlm = FakeVLM(cfg, "attribute: Change the red car to blue.", verify=answer)
    synth = visual_ops.OpsSynthesizer(cfg, vlm=vlm, editor=FakeEditor())
    manifest = visual_ops.run(cfg, [tmp_path / "s1"], tmp_path / "s2",
                              synthesizer=synth)
    asked = [t for t in vlm.asked if t.startswith(cfg.prompts.verify_edit.split("{")[0])]
    assert len(asked) == len(GOOD) and '"Change the red car to blue."' in asked[0]
    recs = all_records(tmp_path / "s2" / job_dir_name("visual_ops", 0, 1))
    if expect == "kept":
        assert len(recs) == len(GOOD) and manifest["num_rejects"] == 0
        assert all(r.provenance["ops"][0]["verified"] is True for r in recs)
    else:
        assert not recs and manifest["rejects_by_reason"] == {expect: len(GOOD)}
        assert manifest["dropped_by_reason"].get("op_not_verified", 0) == (len(GOOD) if mode == "sequential" else 0)


def test_parse_yes_no():
    assert parsing.parse_yes_no("Yes.") is True and parsing.parse_yes_no("<think>x</think><answer>no</answer>") is False
    assert parsing.parse_yes_no("  YES, it does") is True and parsing.parse_yes_no("Nope") is None
    assert parsing.parse_yes_no("") is None and parsing.parse_yes_no("The answer is yes") is None


# ------------------------------------------------------------------------------------- jobs at scale
def test_crash_mid_shard_then_resume(tiny_dirs, image_dir, refiner, tmp_path, monkeypatch):
    cfg = make_config(tiny_dirs, chunk_size=2)
    job = tmp_path / job_dir_name("caption_refine", 0, 1)
    real_write, calls = records.ShardWriter.write, {"n": 0}

    def failing_write(self, record):
        calls["n"] += 1
        if calls["n"] == 3:  # inside the second part's ShardWriter, after one of its records
            raise RuntimeError("simulated crash")
        real_write(self, record)

    monkeypatch.setattr(records.ShardWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        caption_refine.run(cfg, image_dir, tmp_path, refiner=refiner)
    monkeypatch.setattr(records.ShardWriter, "write", real_write)
    assert not list(job.glob("*.tmp*"))  # the aborted shard left nothing behind
    committed = outcomes(job)
    assert 0 < len(committed) < len(GOOD) + len(BAD)
    for shard in job.glob("*.arrayrecord"):
        assert shard.with_suffix(".json").exists()
        list(map(records.decode, records.read_shard(shard)))
    # Also the leftovers of a kill between the two renames: an orphan shard and a temporary file.
    (job / "part-00099.arrayrecord").write_bytes(next(job.glob("*.arrayrecord")).read_bytes())
    (job / "part-00100.arrayrecord.tmp12345").write_bytes(b"partial")

    manifest = caption_refine.run(cfg, image_dir, tmp_path, refiner=refiner)
    assert_exactly_once(job, manifest)


def assert_exactly_once(job: Path, manifest: dict) -> None:
    keys = outcomes(job)
    assert len(keys) == len(set(keys)) == len(GOOD) + len(BAD)
    recs = all_records(job)
    assert sorted(r.provenance["source_rel"] for r in recs) == sorted(GOOD)
    assert manifest["complete"] and manifest["num_records"] == len(GOOD) and manifest["num_rejects"] == len(BAD)
    assert not list(job.glob("*.tmp*")) and not (job / "part-00099.arrayrecord").exists()


def test_killed_process_then_resume(tiny_dirs, image_dir, refiner, tmp_path):
    """A real `python -m synthesis_torch` process killed with SIGKILL after its first committed chunk."""
    env = dict(os.environ, VIPER_TINY_DIR=str(Path(tiny_dirs["vlm"]).parent), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "synthesis_torch", "caption-refine", "--images", str(image_dir), "--out",
           str(tmp_path), "--config", str(REPO / "configs/synth_tiny_cpu.py"), "--config.chunk_size=1",
           f"--config.inputs.max_pixels={MAX_PIXELS}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    job = tmp_path / job_dir_name("caption_refine", 0, 1)
    deadline = time.time() + 90
    while proc.poll() is None and time.time() < deadline and not (job / "part-00001.json").exists():
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert killed or proc.returncode == 0, err.decode()[-2000:]
    assert len(outcomes(job)) < len(GOOD) + len(BAD) or not killed
    manifest = caption_refine.run(make_config(tiny_dirs, chunk_size=1), image_dir, tmp_path, refiner=refiner)
    assert_exactly_once(job, manifest)


def test_two_shard_split_covers_inputs_once(tiny_dirs, image_dir, refiner, tmp_path):
    cfg = make_config(tiny_dirs)
    keys = []
    for index in range(2):
        manifest = caption_refine.run(cfg, image_dir, tmp_path, shard_index=index, num_shards=2, refiner=refiner)
        assert manifest["complete"] and manifest["shard_index"] == index
        keys += outcomes(tmp_path / job_dir_name("caption_refine", index, 2))
    listed = inputs.list_images(image_dir, ["jpg", "jpeg", "png", "webp"])
    assert sorted(keys) == sorted(x.key for x in listed)  # every input exactly once
    assert 0 < len(outcomes(tmp_path / job_dir_name("caption_refine", 0, 2))) < len(listed)

    from synthesis_torch.cli import main
    from synthesis_torch.summary import summarize

    assert main(["summary", str(tmp_path), "--write_manifest"]) == 0
    combined = records.read_manifest(tmp_path)
    assert combined["complete"] and combined["num_records"] == len(GOOD)
    assert all((tmp_path / name).exists() for name in combined["shards"])
    s = summarize(tmp_path)["tasks"]["caption_refine"]
    assert s["missing_shards"] == [] and s["rejects_by_reason"]["unreadable"] == 2 and len(s["samples"]) == 3


def test_stable_ids_seeds_and_split():
    items = [inputs.ImageInput(inputs.stable_key(f"img{i}.jpg"), Path(f"img{i}.jpg"), f"img{i}.jpg") for i in range(50)]
    parts = [inputs.select_shard(items, i, 3) for i in range(3)]
    assert sorted(x.key for p in parts for x in p) == sorted(x.key for x in items)
    assert all(parts)
    # Golden values: record ids and seeds must not change between versions (resumed jobs, rerender).
    assert inputs.stable_key("img0.jpg") == "79416b992e910ae8"
    assert inputs.stable_key("photos/ü.png") == "164856da177bb68b"  # UTF-8 bytes of the path
    assert inputs.derive_seed(0, "abc", "t2i") == 8866174640538084307
    assert inputs.derive_seed(7, "abc", "caption") == 7723659991231531758
    assert inputs.shard_of("abc", 3) == 2
    assert len({inputs.derive_seed(0, "abc", p) for p in ("t2i", "caption", "edit0")}) == 3
    with pytest.raises(ValueError):
        inputs.select_shard(items, 3, 3)


def test_bad_inputs_are_skipped_with_reason(image_dir):
    kw = dict(min_side=24, max_pixels=MAX_PIXELS, max_aspect=8.0, max_bytes=10_000_000)
    for name, reason in BAD.items():
        with pytest.raises(inputs.BadImage) as e:
            inputs.load_image(image_dir / name, **kw)
        assert e.value.reason == reason, (name, e.value.detail)
    data, image = inputs.load_image(image_dir / "sub/c.webp", **kw)
    assert records.image_format(data) == "webp" and image.mode == "RGB" and image.size == (72, 72)
    with pytest.raises(inputs.BadImage, match="bad_aspect"):
        inputs.load_image(image_dir / "a.jpg", **{**kw, "max_aspect": 1.2})
    assert [x.rel for x in inputs.list_images(image_dir, ["jpg", "png"])] == sorted(
        ["a.jpg", "b.png", "broken.jpg", "huge.png", "tiny.png", "truncated.png"])


# -------------------------------------------------------------------------------- parsing / filtering
STRICT = parsing.SentenceRules()


def test_parse_corrections_well_formed_and_malformed():
    text = ("<think>compare them</think>Here are the corrections:\n- The car is red, not blue.\n"
            "2) The sign reads \"OPEN\". It hangs above the door.\n* the CAR is red not blue!\n"
            "- ok\n- 12345 67890 !!!! ####\n\n- There are no other errors.")
    got, dropped = parsing.parse_corrections(text, STRICT, max_items=8)
    assert got == ["The car is red, not blue.", 'The sign reads "OPEN".', "It hangs above the door."]
    assert dropped == {"heading": 1, "duplicate": 1, "too_short": 1, "not_text": 1, "no_error_statement": 1}
    capped, dropped = parsing.parse_corrections(text, STRICT, max_items=2)
    assert len(capped) == 2 and dropped["over_cap"] == 1
    assert parsing.parse_corrections("", STRICT, 8)[0] == []
    assert parsing.parse_corrections("None.", STRICT, 8)[0] == []
    assert parsing.parse_corrections("<answer>- A dog sleeps on the mat.</answer>", STRICT, 8)[0] == [
        "A dog sleeps on the mat."]
    lenient = parsing.SentenceRules(lenient=True)
    assert parsing.parse_corrections("xq zz\n\nxq zz\nk", lenient, 8)[0] == ["xq zz", "k"]


def test_parse_edit_ops_with_types():
    text = ("1. attribute: Change the red car to blue.\n- **Remove**: remove the small sign near the door\n"
            "colour - make the umbrella green and white\nReplace: Replace the dog with a cat.\n"
            "style: make it look like a watercolour\nAdd a red-haired man to the left of the car.\n"
            "add: a\ncount: Change the two cups into three cups.\nreplace: replace the dog with a cat")
    ops, dropped = parsing.parse_edit_ops(text, STRICT, ["attribute", "add", "remove", "replace", "move", "count",
                                                         "text"], max_ops=10)
    assert [(o.type, o.sentence) for o in ops] == [
        ("attribute", "Change the red car to blue."), ("remove", "Remove the small sign near the door."),
        ("attribute", "Make the umbrella green and white."), ("replace", "Replace the dog with a cat."),
        ("count", "Change the two cups into three cups.")]
    assert dropped == {"unknown_type": 1, "no_type": 1, "too_short": 1, "duplicate": 1}
    only, dropped = parsing.parse_edit_ops(text, STRICT, ["remove", "count"], max_ops=1)
    assert [o.type for o in only] == ["remove"] and dropped["over_cap"] == 1 and dropped["type_not_allowed"] == 5
    assert parsing.parse_edit_ops("", STRICT, ["add"], 2)[0] == []
    loose, _ = parsing.parse_edit_ops("qzx vv\nadd: put a hat on the dog", parsing.SentenceRules(lenient=True),
                                      ["add"], 5)
    assert [(o.type, o.instruction) for o in loose] == [("unspecified", "qzx vv"), ("add", "put a hat on the dog")]


def test_entity_selection_rules():
    d = ('A large red and white striped umbrella stands next to a small wooden table. Two black dogs are '
         'lying on the grass in the background. A sign that reads "OPEN" hangs above the door. '
         'The image shows a car.')
    by_phrase = {e.phrase: e for e in extract_entities(d)}
    umbrella = by_phrase["a large red and white striped umbrella"]
    assert umbrella.attributes == ("large", "red", "white", "striped")
    assert set(umbrella.flags) == {"multi_attribute", "relation"}
    assert {"small", "multi_attribute", "relation"} <= set(by_phrase["a small wooden table"].flags)
    assert {"count", "relation"} <= set(by_phrase["two black dogs"].flags)
    assert by_phrase["a sign"].text == "OPEN" and "text" in by_phrase["a sign"].flags
    assert "the image" not in by_phrase and "the background" not in by_phrase  # place words are not entities
    chosen = select_entities(d, max_entities=3, min_score=2)
    assert [e.phrase for e in chosen] == ["a large red and white striped umbrella", "a small wooden table",
                                          "two black dogs"]
    assert select_entities(d, 10, 2) == select_entities(d, 10, 2)  # deterministic
    assert "a car" not in [e.phrase for e in select_entities(d, 10, 2)]  # plain noun: score 0
    assert select_entities("qzx vv kk", 4, 0) == []


# ----------------------------------------------------------------------------------- difference band
def test_difference_band_on_constructed_pairs():
    a = photo(480, 320, 7)
    slight = a.copy()
    side = int((0.05 * 480 * 320) ** 0.5)  # recolour 5 % of the area
    ImageDraw.Draw(slight).rectangle([40, 40, 40 + side, 40 + side], fill=(20, 20, 230))
    buf = io.BytesIO()
    a.save(buf, format="JPEG", quality=90)
    reencoded = Image.open(buf)
    verdict = lambda x, y: diffband.band_verdict(diffband.image_difference(x, y), "changed_fraction", 0.002, 0.7)
    assert diffband.image_difference(a, a) == diffband.Difference(0.0, 0.0)
    assert verdict(a, a) == "no_change" and verdict(a, reencoded) == "no_change"
    assert verdict(a, slight) is None
    assert 0.03 < diffband.image_difference(a, slight).changed_fraction < 0.08
    assert verdict(a, ImageOps.invert(a)) == "too_large"
    assert verdict(a, slight.resize((300, 200))) is None  # sizes need not match
    assert diffband.band_verdict(diffband.image_difference(a, slight), "mean_abs", 0.01, 0.25) is None
    with pytest.raises(ValueError):
        diffband.band_verdict(diffband.Difference(0, 0), "ssim", 0, 1)


# ----------------------------------------------------------------------------------------- config
def test_config_overrides_and_files():
    c = default_config()
    rest = apply_overrides(c, ["--config.t2i.steps=8", "--config.filter.lenient", "true", "--other",
                               "--config.models.vlm=/m/Qwen2.5-VL-7B-Instruct", "--config.diff.max=0.5",
                               "--config.prompts.caption=Describe it."])
    assert rest == ["--other"] and c.t2i.steps == 8 and c.filter.lenient is True and c.diff.max == 0.5
    assert c.models.vlm == "/m/Qwen2.5-VL-7B-Instruct" and c.prompts.caption == "Describe it."
    with pytest.raises(KeyError):
        apply_overrides(c, ["--config.t2i.stepz=8"])
    with pytest.raises(ValueError):
        apply_overrides(c, ["--config.t2i.steps=many"])
    assert load_config(str(REPO / "configs/synth_default.py")).to_dict() == default_config().to_dict()
    assert load_config(str(REPO / "configs/synth_tiny_cpu.py")).filter.lenient is True


def test_synthesis_never_imports_jax():
    code = ("import sys, synthesis_torch.cli, synthesis_torch.caption_refine, synthesis_torch.visual_ops, "
            "synthesis_torch.summary, synthesis_torch.tiny_models, synthesis_torch.editors; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'viper_jax')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_editor_passes_mm_token_type_ids(tiny_dirs):
    """The Edit pipeline's own prompt encoder drops mm_token_type_ids (diffusers #14194), so its text encoder
    falls back to 1D positions over the image tokens; our replacement keeps the multimodal positions."""
    from synthesis_torch.editors import QwenImageEditor

    editor = QwenImageEditor(tiny_dirs["editor"], device=torch.device("cpu"), dtype=torch.float32, offload="none",
                             steps=1, true_cfg_scale=1.0, negative_prompt=" ", area=32 * 32, condition_area=32 * 32)
    pipe, image = editor.pipe, photo(64, 48, 9)
    ours, ours_mask = pipe._get_qwen_prompt_embeds(["make the ball blue"], image)  # bound on the instance
    theirs, theirs_mask = type(pipe)._get_qwen_prompt_embeds(pipe, ["make the ball blue"], image)
    assert ours.shape == theirs.shape and torch.equal(ours_mask, theirs_mask)
    assert not torch.allclose(ours, theirs)
    assert editor.edit(image, "make the ball blue", seed=0).size == (40, 24)  # about 32*32 px, aspect 4:3
