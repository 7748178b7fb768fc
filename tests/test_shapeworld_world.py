"""ShapeWorld's core (NumPy + PIL only): captions parse back to their scenes, the renderer draws what the
scene says (colours checked against the colour table, sizes against the geometry) deterministically, the
PNG carries the scene, and every edit op applies and round-trips through its instruction text."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from viper_common.shapeworld import edits, language, render
from viper_common.shapeworld.scene import (BACKGROUND_RGB, COLOUR_RGB, SHAPES, SIZE_FRACTION, Obj, Scene,
                                           SceneError, sample_scene)

SEEDS = range(400)


def without_offsets(scene: Scene) -> list[Obj]:
    """What a caption states: everything but dx/dy (and an absent label, which a caption never states)."""
    return sorted((dataclasses.replace(o, dx=None, dy=None, label=o.label or None) for o in scene.objects),
                  key=lambda o: o.cell)


# ----------------------------------------------------------------------------------------- language
@pytest.mark.parametrize("background_prob", [1.0, 0.0])
def test_caption_parses_back_to_its_scene(background_prob):
    phrasings = set()
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng)
        text = language.caption(scene, rng, background_prob=background_prob)
        parsed = language.parse_caption(text)
        assert sorted(parsed.objects, key=lambda o: o.cell) == without_offsets(scene), text
        assert parsed.background == (scene.background if background_prob else None), text
        phrasings.add(" ".join(text.split()[:3]))
    assert len(phrasings) >= 50  # sentence frames, words and object order vary


def test_parser_is_tolerant():
    text = ("Well, I think there is a big grey spotted star labelled K in the upper right corner and a tiny "
            "violet diamond on the left; blah qux. Nothing else here! A circle sits in the middle. A square "
            "sits in the middle too. The background colour is navy.")
    scene = language.parse_caption(text)
    assert scene.background == "navy"
    assert scene.objects[0] == Obj(shape="star", hue="gray", size="large", pattern="dotted", label="K", cell=2)
    assert scene.objects[1] == Obj(shape="diamond", hue="purple", size="small", cell=3)
    assert scene.objects[2] == Obj(shape="circle", cell=4)
    assert scene.objects[3] == Obj(shape="square", cell=None)  # the centre is taken: a simulator places it
    assert language.parse_caption("xq zz kkkk. 123 !!") == Scene(None, ())
    # A small object cannot carry a label: the contradiction is dropped, not a crash.
    assert language.parse_caption("A small red circle labelled K.").objects[0].label is None


def test_object_phrases():
    obj = Obj(shape="circle", hue="blue", shade="light", size="small", pattern="striped", label="", cell=0)
    assert language.object_phrase(obj) == "the small light blue circle"
    assert language.object_phrase(obj, "a", ("colour", "pattern", "shape", "position")) == \
        "a light blue striped circle at the top left"
    assert language.parse_object_phrase("the small light blue circle") == Obj(
        shape="circle", hue="blue", shade="light", size="small")
    assert language.parse_object_phrase("the big thing") is None
    assert [language.find_cell(language.region_phrase(c, np.random.default_rng(c)))[0] for c in range(9)] == \
        list(range(9))
    assert language.kind_phrase(Obj(shape="cross", hue="red")) == "red crosses"


# ----------------------------------------------------------------------------------------- render
def one(obj: Obj, background: str = "white") -> Scene:
    return Scene(background, (dataclasses.replace(obj, dx=0.0, dy=0.0),))


def test_render_deterministic_and_seeded():
    scene = sample_scene(np.random.default_rng(3))
    a, b, c = render.render(scene, 7), render.render(scene, 7), render.render(scene, 8)
    assert a.mode == "RGB" and a.size == (112, 112)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    diff = np.abs(np.asarray(a, int) - np.asarray(c, int))
    assert diff.max() > 0  # a new seed: a new background texture and size jitter
    assert render.render(scene, 7, size=140).size == (140, 140)


def test_render_colours_and_patterns_match_the_scene():
    big = Obj(shape="square", hue="blue", shade="dark", size="large", pattern="solid", label="", cell=4)
    centre = lambda im: np.asarray(im, int)[56, 56]  # noqa: E731
    # Solid: the object's centre has exactly the table colour (the box filter averages equal subpixels).
    for shade in ("light", "dark"):
        im = render.render(one(dataclasses.replace(big, shade=shade)), 0)
        assert np.abs(centre(im) - COLOUR_RGB[("blue", shade)]).max() <= 1
    # Outlined: hollow, the centre shows the background (within the gradient and grain, <= 16 + 4 sigma).
    im = render.render(one(dataclasses.replace(big, pattern="outlined")), 0)
    assert np.abs(centre(im) - BACKGROUND_RGB["white"]).max() <= 30
    # Striped and dotted: the colour and its pale tint both occur inside the object.
    for pattern in ("striped", "dotted"):
        px = np.asarray(render.render(one(dataclasses.replace(big, pattern=pattern)), 0), int)[46:67, 46:67]
        dist = lambda rgb: np.abs(px - rgb).max(-1)  # noqa: E731
        assert (dist(COLOUR_RGB[("blue", "dark")]) <= 2).mean() > 0.15, pattern
        assert (dist(render._tint(COLOUR_RGB[("blue", "dark")])) <= 2).mean() > 0.15, pattern


@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_render_sizes_and_every_shape(size):
    """Each shape covers a distinct area of about its geometric size (a square is 0.8 of the diameter, the
    jitter is +-8 %); a small object is about 11 px wide."""
    masks = {}
    for shape in SHAPES:
        obj = Obj(shape=shape, hue="red", shade="dark", size=size, pattern="solid", label="", cell=4)
        px = np.asarray(render.render(one(obj), 0), int)
        mask = np.abs(px - COLOUR_RGB[("red", "dark")]).max(-1) < 60
        rows, cols = np.nonzero(mask)
        width = max(np.ptp(rows), np.ptp(cols)) + 1
        diameter = SIZE_FRACTION[size] * 112
        assert 0.65 * diameter <= width <= 1.15 * diameter, (shape, width, diameter)
        masks[shape] = mask
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() >= 3, (a, b)


def test_label_is_small_and_local():
    obj = Obj(shape="circle", hue="yellow", shade="light", size="medium", pattern="solid", label="", cell=0)
    plain = np.asarray(render.render(one(obj), 1), int)
    labelled = np.asarray(render.render(one(dataclasses.replace(obj, label="K")), 1), int)
    changed = np.abs(plain - labelled).max(-1) > 20
    rows, cols = np.nonzero(changed)
    assert 5 <= changed.sum() <= 60  # a few dozen pixels: a fine detail
    assert rows.max() < 37 and cols.max() < 37  # inside the top-left cell
    assert labelled[rows, cols].sum(-1).mean() < plain[rows, cols].sum(-1).mean()  # dark ink on light yellow


def test_png_metadata_round_trip():
    scene = sample_scene(np.random.default_rng(11))
    data = render.render_png(scene, 42)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert render.read_scene(data) == scene and render.read_seed(data) == 42
    decoded = Image.open(io.BytesIO(data)).convert("RGB")  # what stage 2 does with a record's image
    assert render.read_scene(decoded) == scene and np.array_equal(np.asarray(decoded), render.render(scene, 42))
    plain = io.BytesIO()
    render.render(scene, 42).save(plain, format="PNG")
    assert render.read_scene(plain.getvalue()) is None and render.read_seed(plain.getvalue()) is None
    bad = io.BytesIO()
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text(render.SCENE_KEY, '{"objects": [{"shape": "blob"}]}')
    render.render(scene, 0).save(bad, format="PNG", pnginfo=info)
    with pytest.raises(SceneError, match="shape"):
        render.read_scene(bad.getvalue())
    with pytest.raises(SceneError, match="cannot read"):
        render.read_scene(b"not an image")


# ----------------------------------------------------------------------------------------- edits
def test_every_edit_op_round_trips_and_applies():
    counts = dict.fromkeys(edits.OPS, 0)
    for seed in range(300):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng)
        for op in edits.OPS:
            try:
                edit = edits.random_edit(scene, rng, op)
            except edits.EditError:
                assert op == "text"  # only when no object is big enough for a label
                continue
            line = edits.instruction(edit, scene, rng)
            kind, _, body = line.partition(": ")
            assert kind == op and body[0].isupper() and body.endswith(".")
            assert edits.parse_instruction(line, scene) == edit, line
            assert edits.parse_instruction(body, scene) == edit, body  # what an editor sees
            after = edits.apply_edit(scene, edit, np.random.default_rng(seed))
            check_effect(scene, edit, after)
            counts[op] += 1
    assert min(counts.values()) >= 250


def check_effect(before: Scene, edit: edits.Edit, after: Scene) -> None:
    """The edit changed what it names and nothing else."""
    b, a = list(before.objects), list(after.objects)
    if edit.op in ("attribute", "replace", "move", "text"):
        assert len(a) == len(b) and [o for i, o in enumerate(a) if i != edit.target] == \
            [o for i, o in enumerate(b) if i != edit.target]
        new = a[edit.target]
        if edit.op == "attribute":
            assert getattr(new, edit.attribute) == edit.value
        elif edit.op == "move":
            assert new.cell == edit.cell and dataclasses.replace(new, cell=b[edit.target].cell) == b[edit.target]
        elif edit.op == "text":
            assert new.label == edit.value
        else:
            assert new.shape == edit.obj.shape and new.cell == b[edit.target].cell
    elif edit.op == "add":
        assert a[:-1] == b and edits.matches(a[-1], dataclasses.replace(edit.obj, label=edit.obj.label or None))
    elif edit.op == "remove":
        assert a == b[:edit.target] + b[edit.target + 1:]
    elif edit.op == "count":
        assert sum(edits.matches(o, edit.kind) for o in a) == edit.count
        assert [o for o in a if not edits.matches(o, edit.kind)] == [o for o in b if not edits.matches(o, edit.kind)]


SCENE = Scene("white", (
    Obj(shape="circle", hue="red", shade="dark", size="large", pattern="solid", label="K", cell=0, dx=0.0, dy=0.0),
    Obj(shape="circle", hue="blue", shade="light", size="small", pattern="striped", label="", cell=4, dx=0.0, dy=0.0),
    Obj(shape="star", hue="red", shade="light", size="medium", pattern="dotted", label="", cell=8, dx=0.0, dy=0.0)))


def test_parse_instruction_hand_checked():
    p = lambda text: edits.parse_instruction(text, SCENE)  # noqa: E731
    assert p("Make the blue circle green.") == edits.Edit("attribute", target=1, attribute="hue", value="green")
    assert p("attribute: change the size of the star to big") == edits.Edit("attribute", 2, "size", "large")
    assert p("Remove the label from the red circle.") == edits.Edit("text", target=0, value="")  # not a removal
    assert p("remove: Delete the circle labelled K.") == edits.Edit("remove", target=0)
    assert p("Move the star to the top right corner") == edits.Edit("move", target=2, cell=2)
    assert p("There should be 3 red circles") == \
        edits.Edit("count", kind=Obj(shape="circle", hue="red"), count=3)
    assert p("Replace the star with a big green square.") == \
        edits.Edit("replace", target=2, obj=Obj(shape="square", hue="green", size="large", label=""))
    assert p("Add a small yellow triangle in the lower left.") == \
        edits.Edit("add", obj=Obj(shape="triangle", hue="yellow", size="small", label="", cell=6))


@pytest.mark.parametrize("text, message", [
    ("Remove the square.", "no object"),
    ("Make the circle green.", "ambiguous"),
    ("Move the star to the center.", "taken"),
    ("Write the letter M on the blue circle.", "cannot carry a label"),
    ("Add a red cross at the top left.", "taken"),
    ("Make the star red.", "changes nothing"),
    ("Make the star bigger.", "not a colour"),
    ("qzx vv kk", "no edit frame"),
    ("", "empty"),
    ("There should be two green squares.", "no green squares to copy"),
])
def test_parse_instruction_errors_are_clear(text, message):
    with pytest.raises(edits.EditParseError, match=message):
        edits.parse_instruction(text, SCENE)
