"""The simulated ShapeWorld text-to-image model and editor (synthesis_torch/shapeworld_sim.py), alone and
inside both synthesis stages: through `viper-synth` with the tiny random VLM (gibberish: rejects counted),
and with a scripted VLM writing well-formed world sentences (edits really applied, scenes chain)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from synthesis_torch import caption_refine, cli, visual_ops  # noqa: E402
from synthesis_torch.config import load_config  # noqa: E402
from synthesis_torch.diffusion import build_reconstructor  # noqa: E402
from synthesis_torch.editors import EditorError, build_editor  # noqa: E402
from synthesis_torch.jobs import job_dir_name  # noqa: E402
from synthesis_torch.shapeworld_sim import ShapeWorldEditor, ShapeWorldReconstructor  # noqa: E402
from viper_common import records  # noqa: E402
from viper_common.shapeworld import edits, language, render  # noqa: E402
from viper_common.shapeworld.scene import Obj, Scene, sample_scene  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/synth_shapeworld.py")
N_SCENES = 4


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")  # as stage 2 decodes a record's image


SCENE = Scene("cream", (
    Obj(shape="circle", hue="red", shade="dark", size="large", pattern="solid", label="K", cell=0, dx=0.1, dy=0.0),
    Obj(shape="square", hue="blue", shade="light", size="small", pattern="striped", label="", cell=4, dx=0.0, dy=0.1),
    Obj(shape="star", hue="green", shade="light", size="medium", pattern="dotted", label="", cell=8, dx=0.0, dy=0.0)))


# ---------------------------------------------------------------------------------------------- editor
def test_editor_applies_and_keeps_untouched_pixels():
    image = decoded(render.render_png(SCENE, 5))
    editor = ShapeWorldEditor()
    out = editor.edit(image, "Remove the blue square.", seed=1)
    assert editor.last_report == {"outcome": "applied", "op": "remove"}
    expected = Scene("cream", (SCENE.objects[0], SCENE.objects[2]))
    assert render.read_scene(out) == expected and render.read_seed(out) == 5
    assert np.array_equal(np.asarray(out), np.asarray(render.render(expected, 5)))  # same seed: same background
    changed = np.abs(np.asarray(out, int) - np.asarray(image, int)).max(-1) > 0
    rows, cols = np.nonzero(changed)
    assert 37 <= rows.min() and rows.max() < 75 and 37 <= cols.min() and cols.max() < 75  # only the centre cell
    # The output PNG of stage 2 carries the new scene: the next edit chains on it.
    again = editor.edit(decoded(visual_ops.png_bytes(out)), "Make the star red.", seed=2)
    assert render.read_scene(again).objects[1].hue == "red" and len(render.read_scene(again).objects) == 2


def test_editor_failures_as_configured():
    image = decoded(render.render_png(SCENE, 5))
    never = ShapeWorldEditor(failure_rate=1.0, wrong_object_share=0.0)
    out = never.edit(image, "Remove the blue square.", seed=1)
    assert never.last_report == {"outcome": "not_applied", "op": "remove"}
    assert render.read_scene(out) == SCENE and np.array_equal(np.asarray(out), np.asarray(image))
    wrong = ShapeWorldEditor(failure_rate=1.0, wrong_object_share=1.0)
    scene = render.read_scene(wrong.edit(image, "Remove the blue square.", seed=1))
    assert wrong.last_report["outcome"] == "wrong_object"
    assert len(scene.objects) == 2 and SCENE.objects[1] in scene.objects  # another object went instead
    outcomes = []
    half = ShapeWorldEditor(failure_rate=0.3, wrong_object_share=0.5)
    for seed in range(200):
        half.edit(image, "Make the star red.", seed=seed)
        outcomes.append(half.last_report["outcome"])
    assert 0.2 <= outcomes.count("applied") / 200 <= 0.8 and outcomes.count("applied") > 120  # p = 0.7
    assert outcomes.count("wrong_object") > 10 and outcomes.count("not_applied") > 10
    with pytest.raises(ValueError, match="failure_rate"):
        ShapeWorldEditor(failure_rate=1.5)


def test_editor_bad_inputs():
    editor = ShapeWorldEditor()
    plain = render.render(SCENE, 0)  # pixels only, no metadata
    with pytest.raises(EditorError, match="no 'shapeworld_scene' metadata"):
        editor.edit(plain, "Remove the star.", seed=0)
    plain.info[render.SCENE_KEY] = '{"objects": [{"shape": "blob"}]}'
    with pytest.raises(EditorError, match="malformed.*blob"):
        editor.edit(plain, "Remove the star.", seed=0)
    image = decoded(render.render_png(SCENE, 5))
    for text in ("qzx vv kk", "Remove the triangle.", "Move the star to the top left."):
        out = editor.edit(image, text, seed=0)
        assert editor.last_report["outcome"] == "not_understood" and render.read_scene(out) == SCENE
        assert np.array_equal(np.asarray(out), np.asarray(image))


# ---------------------------------------------------------------------------------------------- t2i
def test_reconstructor_draws_what_the_caption_says():
    recon = ShapeWorldReconstructor()
    rng = np.random.default_rng(0)
    text = language.caption(SCENE, rng)
    images = recon.render([text, text, "xq zz kk"], [(112, 112), (96, 80), (112, 112)], [1, 2, 1])
    drawn = render.read_scene(images[0])
    stated = lambda o: (o.cell, o.shape, o.hue, o.shade, o.size, o.pattern)  # noqa: E731 - all a caption says
    assert sorted(map(stated, drawn.objects)) == sorted(map(stated, SCENE.objects))
    assert [o.label for o in drawn.objects if o.cell == 0] == ["K"]  # the stated label is kept
    assert [o.dx for o in drawn.objects] != [o.dx for o in SCENE.objects]  # positions are jittered anew
    assert images[1].size == (96, 80)
    assert recon.last_reports[0]["objects_read"] == 3 and recon.last_reports[0]["flags"] == []
    assert render.read_scene(images[2]).objects == () and recon.last_reports[2]["flags"] == ["no_objects"]
    again = recon.render([text], [(112, 112)], [1])[0]
    assert np.array_equal(np.asarray(again), np.asarray(images[0]))  # seeded
    # Unstated attributes are drawn at random (per seed), stated ones kept.
    drawn = [render.read_scene(im).objects[0] for im in recon.render(["A star."] * 8, [(112, 112)] * 8, range(8))]
    assert all(o.shape == "star" for o in drawn) and len({(o.hue, o.cell) for o in drawn}) >= 5


def test_registries():
    cfg = load_config(CONFIG)
    assert isinstance(build_reconstructor(cfg, torch.device("cpu"), torch.float32), ShapeWorldReconstructor)
    cfg.editor.failure_rate = 0.25
    editor = build_editor(cfg, torch.device("cpu"), torch.float32)
    assert isinstance(editor, ShapeWorldEditor) and editor.settings()["failure_rate"] == 0.25
    cfg.t2i.name = "nope"
    with pytest.raises(KeyError, match="unknown text-to-image model 'nope'"):
        build_reconstructor(cfg, torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """N_SCENES ShapeWorld PNGs plus one PNG of the same pixels without metadata; the tiny VLM."""
    from synthesis_torch.tiny_models import write_tiny_vlm

    root = tmp_path_factory.mktemp("sw")
    images = root / "images"
    images.mkdir()
    scenes = {}
    for i in range(N_SCENES):
        scene = sample_scene(np.random.default_rng(100 + i), min_objects=2, max_objects=4)
        (images / f"s{i}.png").write_bytes(render.render_png(scene, 100 + i))
        scenes[f"s{i}.png"] = scene
    render.render(scenes["s0.png"], 100).save(images / "plain.png")
    return {"images": images, "scenes": scenes, "vlm": str(write_tiny_vlm(root / "vlm"))}


def all_records(job: Path) -> list[records.ViperRecord]:
    return [records.decode(raw) for shard in sorted(job.glob("*.arrayrecord")) for raw in records.read_shard(shard)]


def test_viper_synth_both_stages_with_tiny_vlm(world, tmp_path, capsys):
    """The CLI with configs/synth_shapeworld.py and the tiny random VLM: gibberish captions give background
    -only reconstructions (counted), the image without metadata is an editor_error reject, gibberish edit
    instructions change nothing (edit_no_change). Lenient parsing lets the gibberish through."""
    flags = [f"--config.models.vlm={world['vlm']}", "--config.filter.lenient=true", "--config.chunk_size=2",
             "--config.vlm.max_new_tokens_caption=24", "--config.vlm.max_new_tokens_critique=24",
             "--config.vlm.max_new_tokens_edit=24", "--config.ops.num_ops=1",
             "--config.ops.fallback_entities=the main object"]
    assert cli.main(["caption-refine", "--images", str(world["images"]), "--out", str(tmp_path),
                     "--config", CONFIG, *flags]) == 0
    job1 = tmp_path / job_dir_name("caption_refine", 0, 1)
    m1 = records.read_manifest(job1)
    assert m1["complete"] and m1["num_records"] == N_SCENES + 1 and m1["num_rejects"] == 0
    recs = all_records(job1)
    flagged = sum(r.provenance["t2i_report"]["flags"] == ["no_objects"] for r in recs)
    assert flagged == m1["dropped_by_reason"].get("t2i_no_objects", 0) and flagged >= 1
    for r in recs:
        name = r.provenance["source_rel"]
        assert r.images[0] == (world["images"] / name).read_bytes()  # verbatim: the metadata survives
        assert render.read_scene(r.images[0]) == world["scenes"].get(name)  # None for plain.png
        assert r.provenance["models"]["t2i"] == "shapeworld" and r.provenance["t2i_settings"]["simulated"]

    assert cli.main(["visual-ops", "--records", str(tmp_path), "--out", str(tmp_path), "--config", CONFIG,
                     *flags]) == 0
    m2 = records.read_manifest(tmp_path / job_dir_name("visual_ops", 0, 1))
    assert m2["complete"] and m2["num_inputs"] == N_SCENES + 1
    assert m2["rejects_by_reason"] == {"editor_error": 1, "edit_no_change": N_SCENES}
    (bad,) = [r for r in m2["rejects"] if r["reason"] == "editor_error"]
    assert bad["source"].endswith("plain.png") and "no 'shapeworld_scene' metadata" in bad["detail"]
    assert m2["dropped_by_reason"]["op_no_change"] == N_SCENES
    capsys.readouterr()


class ScriptedVLM:
    """Well-formed world sentences in place of a trained VLM (a test double: it reads the scene, which
    only a test may do): captions from the grammar, a fixed critique, a refined description that is the
    grammar's caption of the scene (a perfect rewrite), edit lines from `edits`, and a truthful yes/no
    to the edit check (does the edited scene equal the instruction applied to the original?)."""

    path = "scripted-vlm"
    OPS = ("attribute", "remove", "move", "text", "replace")  # edits whose result needs no random draw

    def __init__(self, cfg):
        self.prompts = cfg.prompts
        self.verified = 0  # edit checks asked (ops.verify)

    def generate(self, prompts, batch_size, seeds, **kwargs):
        out = []
        for (images, text), seed in zip(prompts, seeds):
            scene = render.read_scene(images[0]) if images else None
            rng = np.random.default_rng(seed % 2**32)
            if text == self.prompts.caption:
                out.append(language.caption(scene, rng) if scene else "")  # no scene: "empty_caption"
            elif text.startswith(self.prompts.critique[:40]):
                out.append("- The circle at the top left is dark red, not light red.")
            elif text.startswith(self.prompts.refine.split("{")[0]):
                out.append(language.caption(scene, rng))
            elif text.startswith(self.prompts.verify_edit.split("{")[0]):
                self.verified += 1
                instruction = re.search(r'instruction:\n"(.*)"\nDoes', text, re.S).group(1)
                after = render.read_scene(images[1])
                try:
                    shown = after == edits.apply_edit(scene, edits.parse_instruction(instruction, scene))
                except edits.EditError:
                    shown = False
                out.append(f"<think>I compare the two images.</think><answer>{'Yes' if shown else 'No'}.</answer>")
            else:
                lines = []
                for op in rng.permutation(self.OPS):
                    try:
                        lines.append(edits.instruction(edits.random_edit(scene, rng, str(op)), scene, rng))
                    except edits.EditError:
                        continue
                    break
                out.append("\n".join(lines))
        return out


def test_both_stages_strict_with_scripted_vlm(world, tmp_path):
    cfg = load_config(CONFIG)
    cfg.chunk_size, cfg.ops.num_ops = 2, 1
    vlm = ScriptedVLM(cfg)
    stage1 = caption_refine.CaptionRefiner(cfg, vlm=vlm, reconstructor=ShapeWorldReconstructor())
    m1 = caption_refine.run(cfg, world["images"], tmp_path, refiner=stage1)
    assert m1["num_records"] == N_SCENES and m1["rejects_by_reason"] == {"empty_caption": 1}  # plain.png
    refined_by_key = {}
    for r in all_records(tmp_path / job_dir_name("caption_refine", 0, 1)):
        scene = render.read_scene(r.images[0])
        assert r.provenance["t2i_report"]["objects_read"] == len(scene.objects)
        assert r.truth == ("The circle at the top left is dark red, not light red.",)
        # The VLM's rewrite (configs/synth_shapeworld.py keeps vlm.rewrite_refined on): the scripted one
        # writes the scene's caption for the refine seed, not the caption with the correction appended.
        refined = language.caption(scene, np.random.default_rng(
            caption_refine.derive_seed(cfg.seed, r.provenance["image_key"], "refine") % 2**32))
        assert r.provenance["refined_by"] == "vlm" and r.provenance["refined_description"] == refined
        assert "dark red, not light red" not in refined
        refined_by_key[r.provenance["image_key"]] = refined

    stage2 = visual_ops.OpsSynthesizer(cfg, vlm=vlm, editor=ShapeWorldEditor(failure_rate=0.0))
    m2 = visual_ops.run(cfg, [tmp_path], tmp_path, synthesizer=stage2)
    assert m2["complete"] and m2["num_records"] == N_SCENES, json.dumps(m2["rejects_by_reason"])
    for r in all_records(tmp_path / job_dir_name("visual_ops", 0, 1)):
        before, after = render.read_scene(r.images[0]), render.read_scene(r.images[1])
        (op,) = r.provenance["ops"]
        assert op["editor_report"]["outcome"] == "applied" and op["kept"]
        assert after == edits.apply_edit(before, edits.parse_instruction(op["instruction"], before))
        assert r.truth == (op["instruction"],) and op["instruction"].endswith(".")
        assert r.provenance["description"] == refined_by_key[r.provenance["image_key"]]  # entities from it
        assert r.provenance["description_by"] == "vlm"
        assert op["verified"] is True  # configs/synth_shapeworld.py: ops.verify
    assert vlm.verified == N_SCENES


@pytest.mark.parametrize("verify", [True, False])
def test_edit_check_rejects_edits_of_the_wrong_object(world, tmp_path, verify):
    """An editor that always edits another object: every edit passes the difference band. With ops.verify
    (configs/synth_shapeworld.py) the VLM's check denies each one: the edit is dropped, the sample rejected
    (edit_not_verified), both counted in the manifest and the summary. Without it the wrong edits become
    ground truth."""
    from synthesis_torch import summary

    cfg = load_config(CONFIG)
    assert cfg.ops.verify is True
    cfg.chunk_size, cfg.ops.num_ops, cfg.ops.verify = 2, 1, verify
    vlm = ScriptedVLM(cfg)
    stage1 = caption_refine.CaptionRefiner(cfg, vlm=vlm, reconstructor=ShapeWorldReconstructor())
    caption_refine.run(cfg, world["images"], tmp_path, refiner=stage1)
    stage2 = visual_ops.OpsSynthesizer(cfg, vlm=vlm, editor=ShapeWorldEditor(failure_rate=1.0, wrong_object_share=1.0))
    m2 = visual_ops.run(cfg, [tmp_path], tmp_path, synthesizer=stage2)
    recs = all_records(tmp_path / job_dir_name("visual_ops", 0, 1))
    if verify:
        assert m2["num_records"] == 0 and m2["rejects_by_reason"] == {"edit_not_verified": N_SCENES}
        assert m2["dropped_by_reason"] == {"op_not_verified": N_SCENES} and vlm.verified == N_SCENES
        text = summary.format_summary(summary.summarize(tmp_path))
        assert f"edit_not_verified {N_SCENES}" in text and f"op_not_verified {N_SCENES}" in text
    else:
        assert m2["num_records"] == N_SCENES and vlm.verified == 0
        for r in recs:
            (op,) = r.provenance["ops"]
            assert op["editor_report"]["outcome"] == "wrong_object" and r.truth == (op["instruction"],)
        assert cfg.diff.min <= r.provenance["changed_fraction"] <= cfg.diff.max


def test_editor_closest_match_takes_a_loose_reference():
    """`closest_match`: a reference no object matches exactly goes to the one object sharing most of its stated
    attributes (at least two); exact references are read as before; ties and weak matches stay not understood."""
    image = decoded(render.render_png(SCENE, 5))
    strict, loose = ShapeWorldEditor(), ShapeWorldEditor(closest_match=True)
    strict.edit(image, "Make the large blue square yellow.", seed=1)  # the blue square is small
    assert strict.last_report["outcome"] == "not_understood"
    out = loose.edit(image, "Make the large blue square yellow.", seed=1)
    assert loose.last_report == {"outcome": "applied", "op": "attribute", "matched": "closest"}
    assert render.read_scene(out).objects[1].hue == "yellow" and render.read_scene(out).objects[0] == SCENE.objects[0]
    loose.edit(image, "Remove the blue square.", seed=1)
    assert loose.last_report == {"outcome": "applied", "op": "remove"}
    for text in ("Remove the red star.",  # one attribute in common with two objects each: a tie
                 "Remove the purple triangle."):  # nothing in common
        out = loose.edit(image, text, seed=1)
        assert loose.last_report["outcome"] == "not_understood" and render.read_scene(out) == SCENE


def test_loose_attribute_frames():
    """'change X (to) V' and a shade word before the colour: the colour is the change read."""
    assert edits.parse_instruction("Change the blue square to light red.", SCENE) == \
        edits.Edit("attribute", target=1, attribute="hue", value="red")
    assert edits.parse_instruction("Change the star dark.", SCENE) == \
        edits.Edit("attribute", target=2, attribute="shade", value="dark")
    assert edits.parse_instruction("Make the red circle pale blue.", SCENE) == \
        edits.Edit("attribute", target=0, attribute="hue", value="blue")
