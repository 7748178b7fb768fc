"""The base model's general-skill SFT data: what an instruct VLM can do before ViPER, in ShapeWorld.

Kinds of example (scenes from the `base_train` seed range only):
  describe  describe an image; the answer is a caption from `language.caption`
  ask       open-ended questions about coarse facts (shape / colour of the object at a position, what is at
            a position, how many objects, the background); the answer is a short sentence
  compare   two images: "are these the same?" (identical, or two different scenes) and "what is different?"
            for one coarse change (an object removed, added, recoloured, reshaped or moved)
  choose    the answer formats of benchmarks on coarse facts: a multiple-choice question in VLMEvalKit's layout
            answered with the option letter (or, mcq_answer "text", with the option's words), and a yes/no
            question (optional: weight 0 turns it off)
  edit      the image-editing requests of stage-2 synthesis (edit_skills.py: write typed edit instructions
            for named objects, check an edit); weight 0 by default
  follow    instruction following with long prompts: a quoted text about the image, then a question or a request
            for one sentence per object, often with an answer-format instruction (follow_skills.py); weight 0 by
            default
Every answer is `<think>...</think><answer>...</answer>`, the think a short statement of what is looked at.
Each example marks its answer's content words (`focus`: colours, shapes, sizes, counts, positions, yes / no,
the option letter; content_spans): the words that can only be right by reading the image. `viper sft` can
put the loss on them first (sft.focus_steps): with the loss spread over the whole answer a fresh decoder fits
the answer text and never finds its way into the image (docs/shapeworld.md).

Not in here, on purpose: the benchmark's question templates (questions.py; a test checks), fine attributes
as questions (shade, pattern, label, small objects are only in captions), and ViPER's two training tasks
(correcting a caption, listing the edit operations between two images).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from viper_common import records
from viper_common.atomic_files import write_json_atomic
from viper_common.prompts import SYNTHESIS_PROMPTS, reasoning_response as respond
from viper_common.shapeworld import edit_skills, follow_skills, language, render
from viper_common.shapeworld.scene import (BACKGROUNDS, HUES, MAX_OBJECTS, SHAPES, Obj, Scene, sample_object,
                                           sample_scene)
from viper_common.shapeworld.splits import SEED_RANGES

KINDS = ("describe", "ask", "compare", "choose", "edit", "follow")
# Newer kinds last, at weight 0: the draw of the other kinds is the same with or without them (older data unchanged)
DEFAULT_WEIGHTS = {"describe": 0.35, "ask": 0.3, "compare": 0.2, "choose": 0.15, "edit": 0.0, "follow": 0.0}
OPTIONAL_KINDS = ("edit", "follow")  # named in settings.json only when used
MCQ_ANSWERS = ("letter", "text")
SHARD_SIZE = 1000
# The synthesis side asks the base for a caption with SYNTHESIS_PROMPTS["caption"]: it is one of the variants.
DESCRIBE_PROMPTS = ("Describe this image.", "What do you see in this picture?", "Give a description of the image.",
                    "Describe every object in the image and where it is.", SYNTHESIS_PROMPTS["caption"])
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # = evaluation.tsv's
YES_NO_INSTRUCTION = "Please answer yes or no."
# Words whose value is read off the image: attributes, backgrounds, counts, positions, yes / no / nothing.
CONTENT_WORDS = (*language.LEXICON, *BACKGROUNDS, *language.NUMBER_WORDS[1:], "top", "bottom", "left", "right",
                 "center", "centre", "middle", "upper", "lower", "yes", "no", "nothing")
# An article right before a content word is part of its span: after "It is" it is the token that decides between
# a shape answer ("It is a star.") and a hue answer ("It is red."), and a focus loss without it never learnt
# that a shape question takes a shape (base10, docs/shapeworld.md "What the base reads").
_CONTENT = re.compile(r"(?:\b(?:a|an)\s+)?\b(?:" + "|".join(sorted(map(re.escape, CONTENT_WORDS), key=len, reverse=True))
                      + r")\b", re.IGNORECASE)
_ANSWER_BODY = re.compile(r"<answer>(.*)</answer>", re.DOTALL)
_WHOLE_ANSWER = re.compile(r"[A-D]|\d+")  # an option letter or a count: the whole body is content


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    kind: str
    prompt: str               # the user text; the images come first in the user turn
    answer: str               # the full response, <think>...</think><answer>...</answer>
    images: tuple[bytes, ...]
    seed: int

    @property
    def focus(self) -> tuple[tuple[int, int], ...]:
        return content_spans(self.answer)

    def to_record(self) -> records.ViperRecord:
        return records.ViperRecord(id=self.id, task=records.INSTRUCT, images=self.images, truth=(),
                                   prompt=self.prompt, answer=self.answer, answer_focus=self.focus,
                                   provenance={"source": "shapeworld.base_data", "kind": self.kind, "seed": self.seed})


def content_spans(answer: str) -> tuple[tuple[int, int], ...]:
    """[start, end) character spans of the content words inside `answer`'s <answer>...</answer>: every
    CONTENT_WORDS word (with an article right before it), or the whole body when it is an option letter or a
    number. The think is never marked."""
    body = _ANSWER_BODY.search(answer)
    if body is None:
        return ()
    start, text = body.start(1), body.group(1)
    if _WHOLE_ANSWER.fullmatch(text):
        return ((start, start + len(text)),)
    return tuple((start + m.start(), start + m.end()) for m in _CONTENT.finditer(text))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _where(obj: Obj, rng: np.random.Generator) -> str:
    return language.region_phrase(obj.cell, rng)


def _name(obj: Obj) -> str:
    """'a red circle': the coarse name of an object (hue and shape)."""
    return f"{language.article(obj.hue)} {obj.hue} {obj.shape}"


# ------------------------------------------------------------------------------------------------ describe

def describe(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    return _pick(rng, DESCRIBE_PROMPTS), respond(
        "I look at each object in turn: its size, colour, pattern, shape and position, and at the background.",
        language.caption(scene, rng))


# ----------------------------------------------------------------------------------------------------- ask

def ask_parts(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, reasoning, answer) for one short question about `scene`; `ask` formats it."""
    facet = _pick(rng, ("shape", "hue", "what_at", "count", "background"))
    if facet == "count":
        n = len(scene.objects)
        return (_pick(rng, ("Count the objects in this image.", "How many shapes can you see?")),
                "I count the objects one by one.",
                f"There {'is' if n == 1 else 'are'} {language.NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'}.")
    if facet == "background":
        return (_pick(rng, ("Name the colour of the background.", "Which colour is the background?")),
                "I look at the background.", f"The background is {scene.background}.")
    if len(scene.objects) == 1 and facet in ("shape", "hue"):  # nothing to point at: ask about "the object"
        obj = scene.objects[0]
        if facet == "shape":
            return (_pick(rng, ("Which shape do you see?", "Tell me the shape of the object.")),
                    "I look at the object.", f"It is {language.article(obj.shape)} {obj.shape}.")
        return (_pick(rng, ("Tell me the colour of the object.", "Which colour does the object have?")),
                "I look at the object.", f"It is {obj.hue}.")
    cell = int(rng.integers(9))
    where = language.region_phrase(cell, rng)
    i = scene.object_at(cell)
    think = f"I look {where}."
    if facet == "what_at" or i is None:
        prompt = _pick(rng, (f"What is {where}?", f"Tell me what is {where}."))
        return prompt, think, (f"There is {_name(scene.objects[i])} {where}." if i is not None else
                               f"There is nothing {where}.")
    obj = scene.objects[i]
    if facet == "shape":
        prompt = _pick(rng, (f"Tell me the shape of the object {where}.", f"Which shape do you see {where}?"))
        return prompt, think, f"It is {language.article(obj.shape)} {obj.shape}."
    prompt = _pick(rng, (f"Tell me the colour of the object {where}.", f"Which colour does the object {where} have?"))
    return prompt, think, f"It is {obj.hue}."


def ask(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    question, think, answer = ask_parts(scene, rng)
    return question, respond(think, answer)


# ------------------------------------------------------------------------------------------------- compare

def coarse_change(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """One coarse change to a scene and a sentence that says what differs in the second image."""
    objs = list(scene.objects)
    free = [c for c in range(9) if scene.object_at(c) is None]
    options = ["recolour", "reshape"] + (["remove"] if len(objs) > 1 else []) + (["add", "move"] if free else [])
    op = _pick(rng, options)
    if op == "add":
        new = sample_object(rng, int(_pick(rng, free)))
        return Scene(scene.background, (*objs, new)), \
            f"The second image has {_name(new)} {_where(new, rng)} that the first image does not have."
    i = int(rng.integers(len(objs)))
    obj = objs[i]
    if op == "remove":
        return Scene(scene.background, tuple(objs[:i] + objs[i + 1:])), \
            f"The {obj.hue} {obj.shape} {_where(obj, rng)} is missing from the second image."
    if op == "move":
        cell = int(_pick(rng, free))
        moved = dataclasses.replace(obj, cell=cell)
        return scene.replace_object(i, moved), \
            f"The {obj.hue} {obj.shape} has moved from {_where(obj, rng)} to {_where(moved, rng)}."
    if op == "recolour":
        hue = _pick(rng, [h for h in HUES if h != obj.hue])
        return scene.replace_object(i, dataclasses.replace(obj, hue=hue)), \
            f"The {obj.shape} {_where(obj, rng)} is {obj.hue} in the first image and {hue} in the second."
    shape = _pick(rng, [s for s in SHAPES if s != obj.shape])
    return scene.replace_object(i, dataclasses.replace(obj, shape=shape)), \
        f"The {obj.hue} {obj.shape} {_where(obj, rng)} has become {language.article(shape)} {shape}."


COMPARE_THINK = "I compare the two images object by object."
# compare's questions, drawn uniformly (a mode twice: twice as often): the same image twice ("same"), two
# unrelated scenes ("other_scene"), one coarse change asked as "what differs?" ("what_differs"), as "are they
# the same?" ("same_q_changed") or as a "- " list ("list", the critique's format; compare_lists adds it).
COMPARE_MODES = ("same", "other_scene", "what_differs", "what_differs", "same_q_changed")
COMPARE_MODE_NAMES = frozenset(COMPARE_MODES) | {"list"}
LIST_PROMPTS = ("List the differences between the two images, one per line starting with '- '.",
                "What changed from the first image to the second? Write each change on its own line, starting with '- '.")


def compare(scene: Scene, rng: np.random.Generator, seed: int, size: int,
            modes: tuple[str, ...] = COMPARE_MODES) -> tuple[str, str, tuple[bytes, bytes]]:
    """A two-image example of one of `modes` (COMPARE_MODES). Mode "list" writes the difference as a "- " list
    line: the list format an instruct VLM follows when the synthesis asks it to critique a redrawn image
    (never a typed edit op)."""
    first = render.render_png(scene, seed, size)
    mode = _pick(rng, modes)
    think = COMPARE_THINK
    if mode == "same":
        return _pick(rng, ("Are these two images the same?", "Do the two images show the same thing?")), \
            respond(think, "Yes, the two images are the same."), (first, first)
    if mode == "other_scene":
        other = sample_scene(rng)
        return _pick(rng, ("Are these two images the same?", "Do the two images show the same thing?")), \
            respond(think, "No, they show two different scenes."), (first, render.render_png(other, seed + 1, size))
    edited, sentence = coarse_change(scene, rng)
    second = render.render_png(edited, seed, size)
    if mode == "list":
        return _pick(rng, LIST_PROMPTS), respond(think, f"- {sentence}"), (first, second)
    if mode == "same_q_changed":
        return _pick(rng, ("Are these two images the same?", "Do the two images show the same thing?")), \
            respond(think, f"No. {sentence}"), (first, second)
    return _pick(rng, ("What is different between the two images?", "How does the second image differ from the first?")), \
        respond(think, sentence), (first, second)


# -------------------------------------------------------------------------------------------------- choose

def choose(scene: Scene, rng: np.random.Generator, mcq_answer: str = "letter") -> tuple[str, str]:
    """Benchmark answer formats on coarse facts, in templates the benchmark does not use. `mcq_answer` "text"
    answers a multiple-choice question with the option's words ("red"), as instruct VLMs often do and
    VLMEvalKit-style extraction accepts (viper_jax/evaluation/answers.py rule 4): a tiny base binds an option
    to its letter only after far more training than it gets here (base4: one letter per question kind)."""
    if rng.random() < 0.4:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        where = language.region_phrase(obj.cell, rng)
        if rng.random() < 0.5:
            shape = obj.shape if rng.random() < 0.5 else _pick(rng, [s for s in SHAPES if s != obj.shape])
            return f"Is the object {where} {language.article(shape)} {shape}?\n{YES_NO_INSTRUCTION}", \
                respond(f"I look {where}.", "Yes." if shape == obj.shape else "No.")
        hue = obj.hue if rng.random() < 0.5 else _pick(rng, [h for h in HUES if h != obj.hue])
        return f"Is the object {where} {hue}?\n{YES_NO_INSTRUCTION}", \
            respond(f"I look {where}.", "Yes." if hue == obj.hue else "No.")
    facet = _pick(rng, ("shape_here", "hue_here", "count", "background"))
    if facet == "count":
        n = len(scene.objects)
        question, think = "What is the number of objects in the picture?", "I count the objects one by one."
        correct, pool = str(n), [str(m) for m in range(1, 8) if m != n]
    elif facet == "background":
        question, think = "Pick the colour of the background.", "I look at the background."
        correct, pool = scene.background, [b for b in BACKGROUNDS if b != scene.background]
    else:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        where = language.region_phrase(obj.cell, rng)
        think = f"I look {where}."
        if facet == "hue_here":
            question, correct, pool = f"Tell me the colour of the object {where}.", obj.hue, [h for h in HUES if h != obj.hue]
        else:
            question, correct, pool = f"Which shape do you see {where}?", obj.shape, [s for s in SHAPES if s != obj.shape]
    options = [pool[int(k)] for k in rng.permutation(len(pool))[:3]]
    pos = int(rng.integers(4))
    options.insert(pos, correct)
    letters = "ABCD"
    body = "\n".join(f"{letters[k]}. {t}" for k, t in enumerate(options))
    return f"Question: {question}\nOptions:\n{body}\n{MCQ_INSTRUCTION}", \
        respond(think, letters[pos] if mcq_answer == "letter" else correct)


# ------------------------------------------------------------------------------------------------- writing

def _draw_kind(rng: np.random.Generator, weights: dict[str, float] | None) -> str:
    weights = {**DEFAULT_WEIGHTS, **(weights or {})}
    if set(weights) != set(KINDS) or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"weights must be non-negative for exactly {KINDS}, got {weights}")
    p = np.array([weights[k] for k in KINDS], dtype=float)
    return KINDS[int(rng.choice(len(KINDS), p=p / p.sum()))]


def compare_modes_for(compare_lists: bool, compare_modes: tuple[str, ...] | None) -> tuple[str, ...]:
    """The modes compare draws from: `compare_modes` when given, else COMPARE_MODES (+ "list" with compare_lists)."""
    if compare_modes is None:
        return COMPARE_MODES + (("list",) if compare_lists else ())
    unknown = set(compare_modes) - COMPARE_MODE_NAMES
    if not compare_modes or unknown:
        raise ValueError(f"compare_modes must be a non-empty tuple of {sorted(COMPARE_MODE_NAMES)}, got {compare_modes}")
    return tuple(compare_modes)


def example(index: int, size: int = 112, weights: dict[str, float] | None = None,
            one_object_share: float = 0.0, compare_lists: bool = False, mcq_answer: str = "letter",
            compare_modes: tuple[str, ...] | None = None) -> Example:
    """Example `index`, drawn from seed base_train.start + index (deterministic). `one_object_share` of the
    scenes hold a single object: the easiest reading of an image, where a fresh decoder starts to look. An
    edit example the scene cannot make (no object with a unique name, an edit with the same result as the
    one asked for) is a describe example instead."""
    seed = SEED_RANGES["base_train"].start + index
    if seed not in SEED_RANGES["base_train"]:
        raise ValueError(f"example {index} leaves the base_train seed range")
    rng = np.random.default_rng(seed)
    kind = _draw_kind(rng, weights)
    one = one_object_share > 0 and rng.random() < one_object_share  # no draw at 0: older data unchanged
    scene = sample_scene(rng, max_objects=1 if one else MAX_OBJECTS)
    images = (render.render_png(scene, seed, size),)
    if kind == "edit":
        made = edit_skills.write(scene, rng) if rng.random() < 0.6 else edit_skills.verify(scene, rng, seed, size)
        if made is None:
            kind = "describe"
        elif len(made) == 3:
            prompt, answer, images = made
        else:
            prompt, answer = made
    if kind == "compare":
        prompt, answer, images = compare(scene, rng, seed, size, compare_modes_for(compare_lists, compare_modes))
    elif kind == "choose":
        prompt, answer = choose(scene, rng, mcq_answer)
    elif kind == "follow":
        prompt, answer = follow_skills.follow(scene, rng, ask_parts)
    elif kind != "edit":
        prompt, answer = (describe if kind == "describe" else ask)(scene, rng)
    return Example(f"base-{index:08d}", kind, prompt, answer, tuple(images), seed)


def examples(n: int, start: int = 0, size: int = 112, weights: dict[str, float] | None = None,
             one_object_share: float = 0.0, compare_lists: bool = False, mcq_answer: str = "letter",
             compare_modes: tuple[str, ...] | None = None) -> Iterator[Example]:
    for index in range(start, start + n):
        yield example(index, size, weights, one_object_share, compare_lists, mcq_answer, compare_modes)


def _write_shard(path: Path, count: int, start: int, size: int, weights: dict[str, float] | None,
                 one_object_share: float, compare_lists: bool, mcq_answer: str,
                 compare_modes: tuple[str, ...] | None) -> None:
    with records.ShardWriter(path) as writer:
        for ex in examples(count, start, size, weights, one_object_share, compare_lists, mcq_answer, compare_modes):
            writer.write(ex.to_record())


def write_base_data(out_dir: str | os.PathLike, n: int, size: int = 112, shard_size: int = SHARD_SIZE,
                    weights: dict[str, float] | None = None, workers: int = 1, log: Any = None,
                    one_object_share: float = 0.0, compare_lists: bool = False, mcq_answer: str = "letter",
                    compare_modes: tuple[str, ...] | None = None) -> Path:
    """Writes n examples as `instruct` records in shards of shard_size plus `manifest.json`, shards in
    `workers` processes. Resumes: a shard on disk is complete (shards are written atomically) and is kept;
    `settings.json` makes sure a resumed run has the same settings. Progress lines go to `log` (default:
    sys.stderr at call time)."""
    log = log or sys.stderr
    if n < 1 or shard_size < 1 or workers < 1:
        raise ValueError(f"n, shard_size and workers must be >= 1 (got {n}, {shard_size}, {workers})")
    if not 0.0 <= one_object_share <= 1.0:
        raise ValueError(f"one_object_share must be in [0, 1], got {one_object_share}")
    if mcq_answer not in MCQ_ANSWERS:
        raise ValueError(f"mcq_answer must be one of {MCQ_ANSWERS}, got {mcq_answer!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights_used = {k: v for k, v in {**DEFAULT_WEIGHTS, **(weights or {})}.items() if k not in OPTIONAL_KINDS or v}
    settings = {"n": n, "size": size, "shard_size": shard_size, "weights": weights_used,  # older folders: no "edit"
                "seed_start": SEED_RANGES["base_train"].start}
    if one_object_share:
        settings["one_object_share"] = one_object_share
    if compare_lists:
        settings["compare_lists"] = True
    if mcq_answer != "letter":
        settings["mcq_answer"] = mcq_answer
    if compare_modes is not None:
        settings["compare_modes"] = list(compare_modes_for(compare_lists, compare_modes))
    _draw_kind(np.random.default_rng(0), weights)  # validates the weights before any work
    settings_path = out / "settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise ValueError(f"{settings_path}: this folder holds base data written with other settings "
                         f"({settings_path.read_text().strip()}); use a new folder")
    write_json_atomic(settings_path, settings, sort_keys=True)
    num_shards = -(-n // shard_size)
    shards = {f"base-{s:05d}-of-{num_shards:05d}{records.SHARD_SUFFIX}": min(shard_size, n - s * shard_size)
              for s in range(num_shards)}
    todo = [(k, name) for k, name in enumerate(shards) if not (out / name).exists()]
    print(f"  base data: {num_shards - len(todo)}/{num_shards} shards already written", file=log, flush=True)
    jobs = [(out / name, shards[name], k * shard_size, size, weights, one_object_share, compare_lists, mcq_answer,
             compare_modes) for k, name in todo]
    if workers == 1 or len(jobs) < 2:
        done = (_write_shard(*job) for job in jobs)
        pool = None
    else:  # spawn: a fresh interpreter per worker, whatever the parent has loaded (JAX's threads do not fork)
        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"))
        done = (f.result() for f in as_completed([pool.submit(_write_shard, *job) for job in jobs]))
    try:
        for finished, _ in enumerate(done, 1):
            print(f"  base data: {num_shards - len(todo) + finished}/{num_shards} shards", file=log, flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    kinds: dict[str, int] = {}
    for index in range(n):  # cheap to recount (the kind is the seed's first draw), also for resumed shards
        kind = _draw_kind(np.random.default_rng(SEED_RANGES["base_train"].start + index), weights)
        kinds[kind] = kinds.get(kind, 0) + 1
    records.write_manifest(out, shards, task=records.INSTRUCT, kinds=dict(sorted(kinds.items())), image_size=size,
                           weights=settings["weights"], seeds=[settings["seed_start"], n])
    return out
