"""The base's image-editing skills (viper_common/shapeworld/edit_skills.py) and multiple-choice answers in words,
checked against the scenes the images carry and against the parsers the synthesis and `viper eval` use."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from synthesis_torch import parsing
from viper_common.prompts import SYNTHESIS_PROMPTS
from viper_common.shapeworld import base_data, edit_skills, edits, render
from viper_common.shapeworld.scene import Obj, Scene
from viper_jax.evaluation.answers import extract_choice

EDIT_ONLY = {"describe": 0, "ask": 0, "compare": 0, "choose": 0, "edit": 1}
_BODY = re.compile(r"<answer>(.*)</answer>", re.DOTALL)


def _edit_examples(n: int) -> tuple[list, list]:
    exs = [ex for ex in base_data.examples(n, weights=EDIT_ONLY) if ex.kind == "edit"]
    return [ex for ex in exs if len(ex.images) == 1], [ex for ex in exs if len(ex.images) == 2]


def test_written_instructions_parse_and_edit_the_named_objects():
    """Every answer line is a typed op that the synthesis's parser keeps; there is one per requested edit, and
    each instruction resolves, in the image's scene, to the object its quoted name picks out (and only it)."""
    writes, _ = _edit_examples(200)
    assert len(writes) >= 80
    rules = parsing.SentenceRules(lenient=False, min_words=3)
    for ex in writes:
        scene = render.read_scene(ex.images[0])
        num_ops = int(re.match(r"Write (\d) image editing", ex.prompt).group(1))
        names = re.findall(r'"([^"]+)"', ex.prompt)
        assert 1 <= num_ops <= len(names) <= 3
        ops, dropped = parsing.parse_edit_ops(_BODY.search(ex.answer).group(1), rules, edits.OPS, 3)
        assert len(ops) == num_ops and not dropped, ex.answer
        for op, name in zip(ops, names):
            named = [i for i, o in enumerate(scene.objects)
                     if edits.matches(o, edits.parse_object_phrase(name.split(" ", 1)[1]))]
            assert len(named) == 1, (name, scene)
            edit = edits.parse_instruction(op.instruction, scene)
            assert edit.op == op.type
            if edit.op != "count":  # a count edit names the object's kind, not the object
                assert edit.target == named[0], (op.instruction, name)
            assert edits.apply_edit(scene, edit, np.random.default_rng(0)) != scene


def test_verify_answers_yes_exactly_when_the_after_image_shows_the_instruction():
    """The instruction in the prompt, applied to the first image's scene (the same draws), gives the second
    image's scene exactly when the answer is Yes; the prompt is the synthesis's own verify_edit."""
    _, checks = _edit_examples(300)
    verdicts = {"Yes.": 0, "No.": 0}
    head = SYNTHESIS_PROMPTS["verify_edit"].split("{instruction}")[0]
    for ex in checks:
        assert ex.prompt.startswith(head)
        instruction = re.search(r'\n"(.+)"\n', ex.prompt).group(1)
        before, after = (render.read_scene(png) for png in ex.images)
        wanted = edits.apply_edit(before, edits.parse_instruction(instruction, before), np.random.default_rng(ex.seed))
        verdict = _BODY.search(ex.answer).group(1)
        verdicts[verdict] += 1
        assert (after == wanted) == (verdict == "Yes."), (instruction, verdict)
    assert min(verdicts.values()) >= 30, verdicts


def test_edit_kind_is_off_by_default_and_its_prompt_formats_like_the_synthesis():
    """Weight 0 by default: the data is what it was (the settings file names no edit kind); EDIT_PROMPT takes the
    synthesis's keyword arguments (the description among them, unused)."""
    assert base_data.DEFAULT_WEIGHTS["edit"] == 0
    assert [e.answer for e in base_data.examples(30)] == \
        [e.answer for e in base_data.examples(30, weights={**base_data.DEFAULT_WEIGHTS, "edit": 0.0})]
    text = edit_skills.EDIT_PROMPT.format(description="A red star.", num_ops=2, entities='"a red star"; "a circle"')
    assert '"a red star"; "a circle"' in text and "Write 2 image editing" in text


def test_settings_file_records_the_new_options(tmp_path):
    out = base_data.write_base_data(tmp_path / "d", 4, size=56, shard_size=4)
    assert "edit" not in json.loads((out / "settings.json").read_text())["weights"]
    out = base_data.write_base_data(tmp_path / "e", 4, size=56, shard_size=4, weights=EDIT_ONLY, mcq_answer="text")
    settings = json.loads((out / "settings.json").read_text())
    assert settings["weights"]["edit"] == 1 and settings["mcq_answer"] == "text"
    with pytest.raises(ValueError, match="mcq_answer"):
        base_data.write_base_data(tmp_path / "f", 4, mcq_answer="number")


def test_multiple_choice_in_words_is_scored_as_the_right_letter():
    """mcq_answer "text": the answer body is the correct option's words, all of it marked as content; `viper
    eval`'s extraction turns it into the letter of that option; the same seeds give the same questions."""
    choose = {"describe": 0, "ask": 0, "compare": 0, "choose": 1}
    checked = 0
    for words, letter in zip(base_data.examples(200, weights=choose, mcq_answer="text"),
                             base_data.examples(200, weights=choose)):
        assert words.prompt == letter.prompt
        if "Options:" not in words.prompt:
            assert words.answer == letter.answer
            continue
        options = dict(line.split(". ", 1) for line in re.findall(r"^[A-D]\. .+$", words.prompt, re.MULTILINE))
        body = _BODY.search(words.answer).group(1)
        right = _BODY.search(letter.answer).group(1)
        assert body == options[right]
        assert extract_choice(body, options) == right
        start = words.answer.index("<answer>") + len("<answer>")
        assert words.focus == ((start, start + len(body)),) or all(
            set(words.answer[a:b].split()) <= set(body.split()) for a, b in words.focus)
        checked += 1
    assert checked >= 40


def test_random_edit_can_target_a_given_object():
    scene = Scene("white", (Obj("circle", "red", "dark", "large", "solid", "", 0),
                            Obj("star", "blue", "light", "small", "dotted", "", 4)))
    rng = np.random.default_rng(1)
    for op in ("attribute", "remove", "replace", "move"):
        assert edits.random_edit(scene, rng, op, target=1).target == 1
    assert edits.random_edit(scene, rng, "text", target=0).target == 0
    with pytest.raises(edits.EditError, match="too small"):
        edits.random_edit(scene, rng, "text", target=1)
    with pytest.raises(edits.EditError, match="cannot target"):
        edits.random_edit(scene, rng, "add", target=0)
