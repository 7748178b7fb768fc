"""Multiple-choice and yes/no questions over a complete scene: the benchmark's items (see bench.py).

Categories, modelled on the paper's benchmarks:
  coarse         shape / hue of a medium or large object, which object is at a position, the background
  fine           shade (light vs dark, options in close pairs), fill pattern, label letter, small objects
  counting       how many objects / objects of a shape / of a hue
  spatial        which object is left of / above ... another; where one object is relative to another
  multi_image    original and edited image: which edit was made (distractors: other edits of the original)
  hallucination  POPE-style "Is there a <hue> <shape> in the image?", half present, half plausibly absent

Every question carries `values`, the structured meaning of its options (a hue, a count, an object
description, a direction, an edit), and `spec`, what the question asks; tests re-check both against the
scene independently. Referring expressions use coarse attributes only (size, hue, shape, grid cell), never the
asked attribute, and always pick exactly one object of the scene: the grid cell alone is always unique.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import numpy as np

from viper_common.shapeworld.language import PLURALS, article
from viper_common.shapeworld.scene import (BACKGROUNDS, HUES, PATTERNS, SHAPES, Obj, Scene,
                                           sample_scene)

CATEGORIES = ("coarse", "fine", "counting", "spatial", "multi_image", "hallucination")
NUM_OPTIONS = 4
LETTERS = "ABCD"

# Hues that look alike, nearest first: distractors for colour questions (fine-grained ones use these).
HUE_NEIGHBOURS = {"red": ("orange", "pink"), "orange": ("red", "yellow"), "yellow": ("orange", "green"),
                  "green": ("yellow", "blue"), "blue": ("purple", "green"), "purple": ("blue", "pink"),
                  "pink": ("red", "purple"), "gray": ("blue", "purple")}
# Letters that are easy to confuse at a few pixels, nearest first.
LETTER_NEIGHBOURS = {"A": ("R", "H", "X"), "E": ("H", "K", "T"), "H": ("K", "M", "A"), "K": ("X", "R", "H"),
                     "M": ("H", "A", "K"), "R": ("A", "K", "E"), "T": ("E", "X", "K"), "X": ("K", "T", "A")}
POSITION_PHRASES = ("at the top left", "at the top", "at the top right", "on the left", "in the center",
                    "on the right", "at the bottom left", "at the bottom", "at the bottom right")
# (row sign, column sign) of A relative to B -> the phrase completing "A is ___ B".
DIRECTIONS = {(0, -1): "to the left of", (0, 1): "to the right of", (-1, 0): "above", (1, 0): "below",
              (-1, -1): "above and to the left of", (-1, 1): "above and to the right of",
              (1, -1): "below and to the left of", (1, 1): "below and to the right of"}
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}  # (axis, sign)
COARSE_REF_KEYS = ("size", "hue", "shape", "cell")


class NoQuestion(Exception):
    """The scene does not admit this kind of question (e.g. no labelled object); the caller tries another."""


@dataclasses.dataclass(frozen=True)
class Question:
    category: str
    facet: str                  # the kind of question within the category, e.g. "pattern"
    question: str
    options: tuple[str, ...]    # option texts in letter order; empty for yes/no
    answer: str                 # "A".."D", or "yes"/"no"
    values: tuple[Any, ...]     # the structured meaning of each option (empty for yes/no)
    spec: dict[str, Any]        # what is asked: {"op": ..., ...}
    scenes: tuple[Scene, ...]   # one, or (original, edited) for multi_image

    @property
    def kind(self) -> str:
        return "mcq" if self.options else "yes_no"


# ---------------------------------------------------------------------------------- referring expressions

def matches(obj: Obj, ref: dict[str, Any]) -> bool:
    return all(getattr(obj, k) == v for k, v in ref.items())


def ref_phrase(ref: dict[str, Any]) -> str:
    """'the large red circle', 'the small object on the left', 'the blue object'."""
    words = [w for w in (ref.get("size"), ref.get("hue"), ref.get("shape") or "object") if w]
    where = f" {POSITION_PHRASES[ref['cell']]}" if "cell" in ref else ""
    return f"the {' '.join(words)}{where}"


def refer(scene: Scene, index: int, rng: np.random.Generator, exclude: tuple[str, ...] = (),
          keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """A shortest coarse description that picks object `index` alone, never using `exclude`'s attributes
    and always using `keep`'s. Random among the shortest candidates (the cell alone always qualifies)."""
    obj = scene.objects[index]
    keys = [k for k in COARSE_REF_KEYS if k not in exclude and k not in keep]
    found: list[dict[str, Any]] = []
    for r in range(0, len(keys) + 1):
        for subset in itertools.combinations(keys, r):
            ref = {k: getattr(obj, k) for k in (*keep, *subset)}
            if ref and sum(matches(o, ref) for o in scene.objects) == 1:
                found.append(ref)
        if found:
            return found[int(rng.integers(len(found)))]
    raise NoQuestion(f"object {index} has no unique description without {exclude}")


def describe(obj: Obj) -> dict[str, str]:
    return {"hue": obj.hue, "shape": obj.shape}


def describe_text(value: dict[str, str]) -> str:
    return f"{article(value['hue'])} {value['hue']} {value['shape']}"


# ------------------------------------------------------------------------------------------------ helpers

def _pick(rng: np.random.Generator, items, n: int) -> list:
    items = list(items)
    return [items[i] for i in rng.permutation(len(items))[:n]]


def _place(rng: np.random.Generator, correct: Any, distractors: list, slot: int) -> tuple[list, str]:
    """Options with the correct one at position slot % 4 (balanced letters), distractors shuffled."""
    if len(distractors) < NUM_OPTIONS - 1:
        raise NoQuestion(f"only {len(distractors)} distractors")
    rest = _pick(rng, distractors, NUM_OPTIONS - 1)
    pos = slot % NUM_OPTIONS
    return rest[:pos] + [correct] + rest[pos:], LETTERS[pos]


def _mcq(category: str, facet: str, text: str, correct: Any, distractors: list, to_text: Callable[[Any], str],
         spec: dict, scenes: tuple, rng: np.random.Generator, slot: int) -> Question:
    values, answer = _place(rng, correct, distractors, slot)
    options = tuple(to_text(v) for v in values)
    if len(set(options)) != NUM_OPTIONS:
        raise NoQuestion(f"options repeat: {options}")
    return Question(category, facet, text, options, answer, tuple(values), spec, scenes)


def _hue_distractors(rng: np.random.Generator, hue: str) -> list[str]:
    """The nearest hue, then random others: a close distractor in every colour question."""
    near = [HUE_NEIGHBOURS[hue][int(rng.integers(2))]]
    return near + _pick(rng, [h for h in HUES if h != hue and h not in near], 2)


def _indices(scene: Scene, sizes: tuple[str, ...]) -> list[int]:
    return [i for i, o in enumerate(scene.objects) if o.size in sizes]


# ------------------------------------------------------------------------------------------------- coarse

def coarse(scene: Scene, rng: np.random.Generator, slot: int) -> Question:
    big = _indices(scene, ("medium", "large"))
    facet = str(rng.choice(["shape", "hue", "object_at", "background"] if big else ["background"]))
    scenes = (scene,)
    if facet == "background":
        return _mcq("coarse", facet, "What colour is the background of the image?", scene.background,
                    [b for b in BACKGROUNDS if b != scene.background], str, {"op": "background"}, scenes, rng, slot)
    i = int(rng.choice(big))
    obj = scene.objects[i]
    if facet == "object_at":
        text = f"Which object is {POSITION_PHRASES[obj.cell]}?"
        others = [describe(o) for o in scene.objects if (o.hue, o.shape) != (obj.hue, obj.shape)]
        # Distractors: objects elsewhere in the image, then random pairs. Not pairs sharing the answer's hue
        # or shape: the answer would be the option that overlaps most with the others, guessable blind.
        pool = _pick(rng, [d for n, d in enumerate(others) if d not in others[:n]], NUM_OPTIONS - 1)
        pairs = [{"hue": h, "shape": s} for h in HUES for s in SHAPES]
        pool += [d for d in _pick(rng, pairs, 2 * NUM_OPTIONS) if d not in pool and d != describe(obj)]
        return _mcq("coarse", facet, text, describe(obj), pool[:NUM_OPTIONS - 1], describe_text,
                    {"op": "object_at", "cell": obj.cell}, scenes, rng, slot)
    attr = facet
    ref = refer(scene, i, rng, exclude=(attr,))
    if attr == "shape":
        text = f"What shape is {ref_phrase(ref)}?"
        distractors = [s for s in SHAPES if s != obj.shape]
    else:
        text = f"What colour is {ref_phrase(ref)}?"
        distractors = _hue_distractors(rng, obj.hue)
    return _mcq("coarse", facet, text, getattr(obj, attr), distractors, str,
                {"op": "attribute", "ref": ref, "attr": attr}, scenes, rng, slot)


# --------------------------------------------------------------------------------------------------- fine

def fine(scene: Scene, rng: np.random.Generator, slot: int) -> Question:
    labelled = [i for i, o in enumerate(scene.objects) if o.label]
    small = _indices(scene, ("small",))
    facets = ["shade", "pattern"] + (["label"] if labelled else []) + (["small_shape", "small_hue"] if small else [])
    facet = str(rng.choice(facets))
    scenes = (scene,)
    if facet.startswith("small_"):
        i, attr = int(rng.choice(small)), facet[len("small_"):]
        obj = scene.objects[i]
        ref = refer(scene, i, rng, exclude=(attr,), keep=("size",))
        if attr == "shape":
            text, distractors = f"What shape is {ref_phrase(ref)}?", [s for s in SHAPES if s != obj.shape]
        else:
            text, distractors = f"What colour is {ref_phrase(ref)}?", _hue_distractors(rng, obj.hue)
        return _mcq("fine", facet, text, getattr(obj, attr), distractors, str,
                    {"op": "attribute", "ref": ref, "attr": attr}, scenes, rng, slot)
    i = int(rng.choice(labelled if facet == "label" else range(len(scene.objects))))
    obj = scene.objects[i]
    if facet == "shade":
        ref = refer(scene, i, rng, exclude=("hue",))
        other = HUE_NEIGHBOURS[obj.hue][int(rng.integers(2))]
        correct = f"{obj.shade} {obj.hue}"
        pool = [f"{s} {h}" for h in (obj.hue, other) for s in ("light", "dark") if f"{s} {h}" != correct]
        # All three distractors are used (3 of 3), so the other shade of the same hue is always an option.
        return _mcq("fine", facet, f"Which exact colour is {ref_phrase(ref)}?", correct, pool, str,
                    {"op": "colour", "ref": ref}, scenes, rng, slot)
    if facet == "pattern":
        ref = refer(scene, i, rng)
        return _mcq("fine", facet, f"What is the fill pattern of {ref_phrase(ref)}?", obj.pattern,
                    [p for p in PATTERNS if p != obj.pattern], str,
                    {"op": "attribute", "ref": ref, "attr": "pattern"}, scenes, rng, slot)
    ref = refer(scene, i, rng)
    near = list(LETTER_NEIGHBOURS[obj.label])
    return _mcq("fine", facet, f"Which letter is written on {ref_phrase(ref)}?", obj.label, near,
                lambda v: f"the letter {v}", {"op": "attribute", "ref": ref, "attr": "label"}, scenes, rng, slot)


# ----------------------------------------------------------------------------------------------- counting

def counting(scene: Scene, rng: np.random.Generator, slot: int) -> Question:
    facet = str(rng.choice(["objects", "shape", "hue"]))
    if facet == "objects":
        text, filt = "How many objects are there in the image?", {}
    else:
        present = sorted({getattr(o, facet) for o in scene.objects})
        universe = SHAPES if facet == "shape" else HUES
        # Mostly a present value (counts 1..n); one question in five asks about an absent one (count 0).
        value = str(rng.choice(present if rng.random() < 0.8 else [v for v in universe if v not in present]))
        text = f"How many {PLURALS[value]} are there in the image?" if facet == "shape" else \
            f"How many {value} objects are there in the image?"
        filt = {facet: value}
    n = sum(matches(o, filt) for o in scene.objects)
    # Options: four consecutive counts in ascending order, the answer at rank slot % 4. Distractors nearest
    # to n would put the answer in the middle, and a window at a random place would put it mostly first
    # (counts are small): both guessable blind. A scene whose count cannot sit at that rank is skipped.
    rank = slot % NUM_OPTIONS
    start = n - rank
    if start < (1 if facet == "objects" else 0):
        raise NoQuestion(f"count {n} cannot be option {LETTERS[rank]}")
    values = tuple(range(start, start + NUM_OPTIONS))
    return Question("counting", facet, text, tuple(map(str, values)), LETTERS[rank], values,
                    {"op": "count", "filter": filt}, (scene,))


# ------------------------------------------------------------------------------------------------ spatial

def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def spatial(scene: Scene, rng: np.random.Generator, slot: int) -> Question:
    n = len(scene.objects)
    if n < 2:
        raise NoQuestion("spatial questions need two objects")
    rc = [o.row_col for o in scene.objects]
    # "Which object is <relation> B?" needs exactly one object on that side of B (rows/columns of the grid:
    # the jitter inside a cell never reorders objects of different cells), and a hue+shape naming it alone.
    pairs = []
    for relation, (axis, sign) in RELATIONS.items():
        for b in range(n):
            hits = [k for k in range(n) if _sign(rc[k][axis] - rc[b][axis]) == sign]
            if len(hits) == 1 and sum(describe(o) == describe(scene.objects[hits[0]]) for o in scene.objects) == 1:
                pairs.append((relation, b, hits[0]))
    if not pairs or rng.random() < 0.5:
        a, b = (int(x) for x in rng.permutation(n)[:2])
        ref_a, ref_b = refer(scene, a, rng, exclude=("cell",)), refer(scene, b, rng, exclude=("cell",))
        d = (_sign(rc[a][0] - rc[b][0]), _sign(rc[a][1] - rc[b][1]))
        text = f"Where is {ref_phrase(ref_a)} relative to {ref_phrase(ref_b)}?"
        return _mcq("spatial", "relative", text, list(d), [list(k) for k in DIRECTIONS if k != d],
                    lambda v: DIRECTIONS[tuple(v)], {"op": "direction", "a": ref_a, "b": ref_b}, (scene,), rng, slot)
    relation, b, hit = pairs[int(rng.integers(len(pairs)))]
    axis, sign = RELATIONS[relation]
    ref_b = refer(scene, b, rng, exclude=("cell",))
    # Distractors: objects clearly on the other side (same row/column is not "clearly"), then absent objects.
    present = [describe(o) for o in scene.objects]
    pool = [present[k] for k in range(n) if _sign(rc[k][axis] - rc[b][axis]) == -sign]
    pool = [d for m, d in enumerate(pool) if d not in pool[:m] and d != present[hit]]
    absent = [{"hue": h, "shape": s} for h in HUES for s in SHAPES if {"hue": h, "shape": s} not in present]
    pool += _pick(rng, absent, NUM_OPTIONS - 1 - min(len(pool), NUM_OPTIONS - 1))
    text = f"Which object is {'to the ' if 'of' in relation else ''}{relation} {ref_phrase(ref_b)}?"
    return _mcq("spatial", relation.replace(" ", "_"), text, present[hit], pool,
                lambda v: f"the {v['hue']} {v['shape']}", {"op": "relation", "relation": relation, "b": ref_b},
                (scene,), rng, slot)


# ------------------------------------------------------------------------------------------- hallucination

def hallucination(scene: Scene, rng: np.random.Generator, slot: int) -> Question:
    """Yes for even slots, no for odd ones. Absent objects are plausible: a present shape in another hue, or
    a present hue on another shape (POPE's 'adversarial' sampling), else any absent pair."""
    present = {(o.hue, o.shape) for o in scene.objects}
    if slot % 2 == 0:
        hue, shape = sorted(present)[int(rng.integers(len(present)))]
        facet = "present"
    else:
        near = [(h, s) for h in HUES for s in SHAPES if (h, s) not in present and
                any(h == ph or s == ps for ph, ps in present)]
        pool = near or [(h, s) for h in HUES for s in SHAPES if (h, s) not in present]
        hue, shape = pool[int(rng.integers(len(pool)))]
        facet = "absent_near" if near else "absent"
    text = f"Is there {article(hue)} {hue} {shape} in the image?"
    return Question("hallucination", facet, text, (), "yes" if slot % 2 == 0 else "no", (),
                    {"op": "exists", "filter": {"hue": hue, "shape": shape}}, (scene,))


# --------------------------------------------------------------------------------------------- multi_image

MULTI_IMAGE_QUESTION = ("The second image is an edited version of the first image. "
                        "Which edit turns the first image into the second?")


def visible_key(scene: Scene) -> tuple:
    """What an edit visibly changes: everything but the jitter inside a cell, independent of object order."""
    return scene.background, tuple(sorted((o.cell, o.shape, o.hue, o.shade, o.size, o.pattern, o.label)
                                          for o in scene.objects))


def _edit_text(edit: Any, scene: Scene, rng: np.random.Generator) -> str:
    """The edit's instruction without its '<type>: ' prefix (the type would give the answer away)."""
    from viper_common.shapeworld import edits

    return edits.instruction(edit, scene, rng).partition(": ")[2]


def multi_image(scene: Scene, rng: np.random.Generator, slot: int) -> Question:
    from viper_common.shapeworld import edits

    op = str(rng.choice(edits.OPS))
    try:
        edit = edits.random_edit(scene, rng, op)
        edited = edits.apply_edit(scene, edit)  # no rng: what the instruction leaves open is fixed
    except edits.EditError as e:
        raise NoQuestion(str(e)) from None
    target = visible_key(edited)
    if target == visible_key(scene):
        raise NoQuestion("the edit changes nothing visible")
    correct = _edit_text(edit, scene, rng)
    # Distractors: other edits of the same original (same type first), each changing the image differently.
    distractors, seen_keys, seen_texts = [], {target, visible_key(scene)}, {correct}
    for attempt in range(40):
        try:
            other = edits.random_edit(scene, rng, op if attempt < 20 else str(rng.choice(edits.OPS)))
            key = visible_key(edits.apply_edit(scene, other))
        except edits.EditError:
            continue
        text = _edit_text(other, scene, rng)
        if key in seen_keys or text in seen_texts:
            continue
        seen_keys.add(key)
        seen_texts.add(text)
        distractors.append((other, text))
        if len(distractors) == NUM_OPTIONS - 1:
            break
    values, answer = _place(rng, (edit, correct), distractors, slot)
    return Question("multi_image", op, MULTI_IMAGE_QUESTION, tuple(t for _, t in values), answer,
                    tuple(e for e, _ in values), {"op": "edit"}, (scene, edited))


GENERATORS: dict[str, Callable[[Scene, np.random.Generator, int], Question]] = {
    "coarse": coarse, "fine": fine, "counting": counting, "spatial": spatial, "multi_image": multi_image,
    "hallucination": hallucination}
# Scenes per category: spatial questions need two objects; counting wants repeated shapes and hues.
MIN_OBJECTS = {"spatial": 2, "counting": 2}


def _counting_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """Makes repeats likely: each object after the first copies the shape or hue of an earlier one w.p. 0.5."""
    objs = list(scene.objects)
    for k in range(1, len(objs)):
        if rng.random() < 0.5:
            src = objs[int(rng.integers(k))]
            attr = str(rng.choice(["shape", "hue"]))
            objs[k] = dataclasses.replace(objs[k], **{attr: getattr(src, attr)})
    return Scene(scene.background, tuple(objs))


def make_question(category: str, seed: int, slot: int) -> Question | None:
    """The question for `seed` (scene and question both drawn from it), answer at letter slot % 4 (or yes
    for an even slot); None when the drawn scene admits no such question (the caller moves to the next seed)."""
    if category not in GENERATORS:
        raise KeyError(f"unknown category {category!r}; known: {CATEGORIES}")
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, min_objects=MIN_OBJECTS.get(category, 1))
    if category == "counting":
        scene = _counting_scene(scene, rng)
    try:
        return GENERATORS[category](scene, rng, slot)
    except NoQuestion:
        return None
