"""The base model's image-editing skills: what an instruct VLM does for ViPER's stage-2 synthesis, in ShapeWorld.

Stage 2 asks the synthesising VLM to write typed edit instructions for named entities of an image, and (with
`ops.verify`) to check an edit it asked for; a real Qwen2.5-VL-Instruct follows such requests out of the box.
The world's base learns them as general instruction following (base_data kind "edit"):
  write   an image and one to three objects named as a describer would name them (the noun phrases that
          synthesis_torch.entities picks from a caption); the answer is one '<type>: <instruction>' line per
          requested edit, each naming its object by the phrase it was given
  verify  the image before an edit, the image after it and the instruction: "Yes." when the second image
          shows the instruction's result, "No." when it shows another edit (another object, another change)
          or no change at all

This is neither of ViPER's two training tasks: nothing here predicts what differs between two images as a
list of operations, nor corrects a caption. The prompts are the ones configs/synth_shapeworld.py gives the
synthesis (EDIT_PROMPT) or the synthesis's own (verify_edit).
"""

from __future__ import annotations

import numpy as np

from viper_common.prompts import SYNTHESIS_PROMPTS, reasoning_response
from viper_common.shapeworld import edits, render
from viper_common.shapeworld.language import object_phrase
from viper_common.shapeworld.scene import LABELLED_SIZES, Scene

# The world's wording of SYNTHESIS_PROMPTS["edit_instructions"] (the synthesis shows the image with it): the
# same request and line form, without the description (the tiny base reads the image, and sequences stay short).
EDIT_PROMPT = ("Write {num_ops} image editing instruction(s) that change these objects in the image: {entities}. "
               "Each line has the form '<type>: <instruction>' where <type> is one of attribute, add, remove, "
               "replace, move, count, text. Write only the lines.")
# The fields a describer's noun phrase carries, as synthesis_torch.entities extracts them from captions.
_NAME_FIELDS = (("size", "colour", "pattern", "shape"), ("size", "colour", "shape"), ("colour", "pattern", "shape"),
                ("size", "pattern", "shape"), ("colour", "shape"))
_TARGET_OPS = ("attribute", "attribute", "remove", "replace", "move", "count", "text")


def entity_name(scene: Scene, index: int, rng: np.random.Generator) -> str | None:
    """'a large deep purple striped star': a noun phrase naming object `index` that no other object in the
    scene matches, or None when none of the describer's phrasings is unique."""
    obj = scene.objects[index]
    order = rng.permutation(len(_NAME_FIELDS))
    for k in order:
        fields = _NAME_FIELDS[int(k)]
        partial = edits._partial(obj, fields)
        if [i for i, o in enumerate(scene.objects) if edits.matches(o, partial)] == [index]:
            return object_phrase(obj, "a", fields)
    return None


def _edit_of(scene: Scene, index: int, rng: np.random.Generator) -> edits.Edit | None:
    ops = [op for op in _TARGET_OPS if op != "text" or scene.objects[index].size in LABELLED_SIZES]
    for _ in range(4):
        try:
            return edits.random_edit(scene, rng, edits._pick(rng, tuple(ops)), target=index)
        except edits.EditError:  # no free cell to move to, no other count: try another op
            continue
    return None


def write(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    """(prompt, answer) asking for edit instructions for named objects; None when no object has a unique name."""
    order = [int(i) for i in rng.permutation(len(scene.objects))]
    named = [(i, name) for i in order if (name := entity_name(scene, i, rng))][:int(rng.integers(1, 4))]
    if not named:
        return None
    num_ops = int(rng.integers(1, len(named) + 1))
    lines = []
    for i, name in named[:num_ops]:
        edit = _edit_of(scene, i, rng)
        if edit is None:
            return None
        lines.append(edits.instruction(edit, scene, rng, ref="the " + name.split(" ", 1)[1]))
    prompt = EDIT_PROMPT.format(num_ops=num_ops, entities="; ".join(f'"{name}"' for _, name in named))
    return prompt, reasoning_response("I pick one edit for each object I was asked to change.", "\n".join(lines))


def verify(scene: Scene, rng: np.random.Generator, seed: int, size: int
           ) -> tuple[str, str, tuple[bytes, bytes]] | None:
    """(prompt, answer, (before, after)) checking an edit: half the time the after image shows the
    instruction's result, otherwise another edit of the scene or no change (how real editors fail)."""
    try:  # a random op the scene cannot take (no label to change, a full grid): no example
        asked = edits.random_edit(scene, rng)
        text = edits.instruction(asked, scene, rng).split(": ", 1)[1]
        wanted = edits.apply_edit(scene, asked, np.random.default_rng(seed))
        after, verdict = wanted, "Yes."
        if rng.random() < 0.5:
            after = scene if rng.random() < 0.25 else edits.apply_edit(scene, edits.random_edit(scene, rng),
                                                                          np.random.default_rng(seed))
            verdict = "No."
    except edits.EditError:
        return None
    if verdict == "No." and after == wanted:  # another edit with the same result is not a failure
        return None
    prompt = SYNTHESIS_PROMPTS["verify_edit"].format(instruction=text)
    return prompt, reasoning_response("I compare the two images with the instruction.", verdict), \
        (render.render_png(scene, seed, size), render.render_png(after, seed, size))
