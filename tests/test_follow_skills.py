"""The base's instruction following (viper_common/shapeworld/follow_skills.py, base_data kind "follow"), checked
against the scenes the images carry and the caption parser the simulators use."""

from __future__ import annotations

import json
import re

from viper_common import prompts
from viper_common.shapeworld import base_data, follow_skills, language, render

FOLLOW_ONLY = {"describe": 0, "ask": 0, "compare": 0, "choose": 0, "edit": 0, "follow": 1}
_BODY = re.compile(r"<answer>(.*)</answer>", re.DOTALL)
_QUOTED = re.compile(r'^[^\n]*\n"(.*)"\n', re.DOTALL)


def _objects(scene) -> set[tuple]:
    return {(o.size, o.shade, o.hue, o.pattern, o.shape, o.label or None, o.cell) for o in scene.objects}


def test_list_answers_state_the_image_and_not_the_quoted_text():
    """A list answer parses back to exactly the image's objects (every attribute, label and cell), one sentence each,
    also when the quoted text is about another scene; ask answers are base_data.ask's, after a think that says the
    answer comes from the image."""
    exs = list(base_data.examples(120, weights=FOLLOW_ONLY))
    assert {ex.kind for ex in exs} == {"follow"}
    lists = [ex for ex in exs if any(i in ex.prompt for i in follow_skills.LIST_INSTRUCTIONS)]
    asks = [ex for ex in exs if ex not in lists]
    assert len(lists) >= 40 and len(asks) >= 40
    other_texts = 0
    for ex in lists:
        scene = render.read_scene(ex.images[0])
        body = _BODY.search(ex.answer).group(1)
        assert _objects(language.parse_caption(body)) == _objects(scene), (body, scene)
        assert len([s for s in re.split(r"(?<=\.)\s+", body) if s]) == len(scene.objects)
        quoted = language.parse_caption(_QUOTED.match(ex.prompt).group(1))
        other_texts += _objects(quoted) != _objects(scene)
    assert 0.2 * len(lists) < other_texts < 0.6 * len(lists), other_texts  # 40% of the texts are another scene's
    for ex in asks:
        assert ex.answer.startswith("<think>" + follow_skills.ASK_THINK), ex.answer
        assert ex.focus, ex.answer  # the content words of base_data.ask's answer stay marked


def test_prompts_are_long_vary_in_format_and_hold_no_viper_task():
    exs = list(base_data.examples(120, weights=FOLLOW_ONLY))
    with_format = [ex for ex in exs if any(f in ex.prompt for f in follow_skills.FORMAT_INSTRUCTIONS)]
    assert 0.3 * len(exs) < len(with_format) < 0.7 * len(exs)
    assert any(prompts.RESPONSE_FORMAT in ex.prompt for ex in with_format)
    openings = [p.split("{")[0][:60] for p in prompts.TRAINING_PROMPTS.values()]
    for ex in exs:
        assert ex.prompt.split("\n", 1)[0] in follow_skills.TEXT_INTROS
        assert not any(o in ex.prompt for o in openings), ex.prompt
        assert not re.search(r"mistake|correct|wrong|differ", ex.answer, re.IGNORECASE), ex.answer
        assert len(ex.images) == 1


def test_follow_kind_is_off_by_default_and_named_in_settings_only_when_used(tmp_path):
    assert base_data.DEFAULT_WEIGHTS["follow"] == 0
    assert [e.answer for e in base_data.examples(30)] == \
        [e.answer for e in base_data.examples(30, weights={**base_data.DEFAULT_WEIGHTS, "follow": 0.0})]
    out = base_data.write_base_data(tmp_path / "d", 4, size=56, shard_size=4)
    assert "follow" not in json.loads((out / "settings.json").read_text())["weights"]
    out = base_data.write_base_data(tmp_path / "e", 4, size=56, shard_size=4, weights=FOLLOW_ONLY)
    assert json.loads((out / "settings.json").read_text())["weights"]["follow"] == 1
