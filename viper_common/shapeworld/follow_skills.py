"""The base model's instruction following: long prompts with text inside them and stated answer formats.

ViPER's training prompts are long: the caption-refine prompt quotes a whole description of the image, then gives
an instruction and an answer format (viper_common/prompts.py). A real Qwen2.5-VL-Instruct follows a new
instruction of that shape out of the box; the world's base, trained only on short questions, answered it with an
empty `<think><answer>` block (runs rq12-rq14, docs/shapeworld.md). These examples give it the general skill
(base_data kind "follow"), in wordings of their own:
  ask    a quoted text about an image (a caption of this image, or of another scene: the text may be wrong), then
         one of base_data.ask's questions, to be answered from the image
  list   a quoted text as above, then "list the objects in the image, one short sentence each": one sentence per
         object the image shows, whatever the text said
Half of the prompts end with an answer-format instruction, in one of several wordings; the project's own
RESPONSE_FORMAT is one of them, as a real instruct model has met many such instructions.

Neither is one of ViPER's two tasks: nothing here lists what a text got wrong (no correction is ever written; the
answer describes the image, not the text) and nothing compares two images. A test checks that no training
prompt's opening appears.
"""

from __future__ import annotations

import numpy as np

from viper_common.prompts import RESPONSE_FORMAT, reasoning_response
from viper_common.shapeworld import language
from viper_common.shapeworld.language import _pick
from viper_common.shapeworld.scene import Scene, sample_scene

MODES = ("ask", "list")
TEXT_INTROS = ("A note written about this picture says:", "Someone wrote the following text about an image:",
               "Read this text first:", "Context (it may not match the picture):",
               "The following caption came with the picture:")
LIST_INSTRUCTIONS = ("List the objects in the image, one short sentence each.",
                     "Using the image, write one short sentence for every object you can see.",
                     "Name every object that the picture shows and where it is, one sentence per object.")
FORMAT_INSTRUCTIONS = (RESPONSE_FORMAT,
                       "Put your reasoning in <think> </think> and the answer in <answer> </answer>.",
                       "Reason inside <think> </think> tags first, then answer inside <answer> </answer> tags.")
ASK_THINK = "I read the text, but I answer from the image. "


def quoted_text(scene: Scene, rng: np.random.Generator) -> str:
    """The text in the prompt: a caption of this scene, or (40%) of another scene, so that copying it is not a
    way to answer."""
    about = scene if rng.random() < 0.6 else sample_scene(rng)
    return language.caption(about, rng)


def follow(scene: Scene, rng: np.random.Generator, ask_fn) -> tuple[str, str]:
    """(prompt, answer) for one instruction-following example of `scene`. `ask_fn(scene, rng)` is
    base_data.ask_parts, returning (question, reasoning, answer) (passed in, so this module does not import
    base_data)."""
    text = quoted_text(scene, rng)
    mode = _pick(rng, MODES)
    if mode == "ask":
        question, think, body = ask_fn(scene, rng)
        answer = reasoning_response(ASK_THINK + think, body)
    else:
        question = _pick(rng, LIST_INSTRUCTIONS)
        lines = [language.object_sentence(scene.objects[int(i)], rng) for i in rng.permutation(len(scene.objects))]
        answer = reasoning_response("I look at each object in the image in turn.", " ".join(lines))
    prompt = f'{_pick(rng, TEXT_INTROS)}\n"{text}"\n{question}'
    if rng.random() < 0.5:
        prompt += " " + _pick(rng, FORMAT_INSTRUCTIONS)
    return prompt, answer
