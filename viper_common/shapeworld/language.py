"""ShapeWorld's English: captions from scenes (with variety), and a tolerant parser from free text back.

Generation. `describe_object` names one object with every attribute (size, shade and hue, pattern, shape,
label), with varied word order and synonyms; `caption` puts one object per sentence in a random order, in
one of several sentence frames, with an optional count sentence and an optional background sentence.

Parsing. `parse_caption` splits text into sentences and clauses and reads each with `parse_object_phrase`:
the label ('labelled K', 'with the letter K', 'marked with a K'), the position (a grid cell from 'top left',
'upper right', 'in the middle', 'on the left', ...) and then the first word of each attribute class (with
synonyms: big -> large, pale -> light, grey -> gray, spotted -> dotted, hollow -> outlined, ...). What it does
not recognise it ignores; an object needs a shape word; an attribute not stated stays None (a caption that
does not mention a label gives label None, not ""). So any caption of this grammar parses back to its scene
except dx/dy (and labels that were absent, which stay None).
"""

from __future__ import annotations

import re

import numpy as np

from viper_common.shapeworld.scene import (BACKGROUNDS, CELLS, HUES, LABELLED_SIZES, SHAPES, Obj, Scene)

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "cross": "crosses"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Words the parser understands: word -> (field, value). Generation uses a subset (see the _*_WORDS tables).
LEXICON: dict[str, tuple[str, str]] = {
    **{s: ("shape", s) for s in SHAPES}, **{p: ("shape", s) for s, p in PLURALS.items()},
    **{h: ("hue", h) for h in HUES}, "grey": ("hue", "gray"), "violet": ("hue", "purple"),
    "light": ("shade", "light"), "pale": ("shade", "light"), "dark": ("shade", "dark"), "deep": ("shade", "dark"),
    "small": ("size", "small"), "little": ("size", "small"), "tiny": ("size", "small"),
    "medium": ("size", "medium"), "large": ("size", "large"), "big": ("size", "large"), "huge": ("size", "large"),
    "solid": ("pattern", "solid"), "filled": ("pattern", "solid"),
    "striped": ("pattern", "striped"), "stripy": ("pattern", "striped"), "stripes": ("pattern", "striped"),
    "dotted": ("pattern", "dotted"), "spotted": ("pattern", "dotted"), "dots": ("pattern", "dotted"),
    "outlined": ("pattern", "outlined"), "outline": ("pattern", "outlined"), "hollow": ("pattern", "outlined"),
}
_SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium", "medium-sized"), "large": ("large", "big")}
_SHADE_WORDS = {"light": ("light", "pale"), "dark": ("dark", "deep")}
# Pattern as an adjective before the shape, or as a phrase after it.
_PATTERN_ADJ = {"solid": ("solid", "filled"), "striped": ("striped",), "dotted": ("dotted", "spotted"),
                "outlined": ("outlined", "hollow")}
_PATTERN_POST = {"solid": ("filled with solid colour",), "striped": ("with stripes",),
                 "dotted": ("with dots", "covered in dots"), "outlined": ("drawn only in outline",)}
_LABEL_POST = ('labelled "{}"', "labelled {}", "with the letter {} on it", "marked with {}")
# Region phrases per cell; the first of each is the canonical one (`region_phrase(cell)`).
_REGIONS = {
    0: ("at the top left", "in the top left corner", "in the upper left"),
    1: ("at the top", "in the top middle", "along the top edge"),
    2: ("at the top right", "in the top right corner", "in the upper right"),
    3: ("on the left", "at the left side", "in the middle of the left side"),
    4: ("in the center", "in the middle", "at the centre"),
    5: ("on the right", "at the right side", "in the middle of the right side"),
    6: ("at the bottom left", "in the bottom left corner", "in the lower left"),
    7: ("at the bottom", "in the bottom middle", "along the bottom edge"),
    8: ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
_FRAMES = ("{Desc} sits {region}.", "{Region}, there is {desc}.", "There is {desc} {region}.",
           "{Desc} can be seen {region}.", "{Region} you can see {desc}.", "{Region} is {desc}.")
_BACKGROUND_FRAMES = ("The background is {bg}.", "Everything is on a {bg} background.",
                      "The scene has a {bg} background.", "All of this is set against a {bg} background.")

_VERT = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_HORIZ = {"left": 0, "right": 2}
_CENTRE = r"(?:center|centre|middle)"
_POSITION = re.compile(
    rf"\b(?P<v>top|upper|bottom|lower)[\s-]+(?P<h>left|right)\b"
    rf"|\b(?P<v2>top|upper|bottom|lower)[\s-]+{_CENTRE}\b|\b{_CENTRE}[\s-]+(?P<h2>left|right)\b"
    rf"|\b{_CENTRE}\s+of\s+the\s+(?P<h3>left|right)\b|\b(?P<h4>left|right)[\s-]+{_CENTRE}\b"
    rf"|\b(?P<v3>top|upper|bottom|lower)\b|\b(?P<h5>left|right)\b|\b(?P<c>{_CENTRE})\b", re.IGNORECASE)
_LABEL = re.compile(r"(?i:\blabell?ed|\bmarked(?:\s+with)?|\bwith\s+the\s+letter|\bbearing\s+the\s+letter|"
                    r"\bwith\s+a\s+letter)\s+(?i:an?\s+(?=[A-Z]\b)|the\s+letter\s+)?[\"'\u201c]?([A-Z])(?![A-Za-z])")
_BACKGROUND = re.compile(
    rf"\b(?:an?\s+)?(?P<a>{'|'.join(BACKGROUNDS)})(?:[\s-]+colou?red)?[\s-]+background\b"
    rf"|\bbackground\s+(?:colou?r\s+)?(?:is|of)\s+(?:an?\s+)?(?P<b>{'|'.join(BACKGROUNDS)})\b", re.IGNORECASE)
_SENTENCES = re.compile(r"[.!?;\n]+")
_CLAUSES = re.compile(r",?\s+(?:and|while|whereas|but)\s+(?=(?:there\s+is\s+)?(?:an?|one|the)\s)|,\s+(?=(?:an?)\s)",
                      re.IGNORECASE)


def _pick(rng: np.random.Generator | None, options):
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def region_phrase(cell: int, rng: np.random.Generator | None = None) -> str:
    """'at the top left', 'in the center', ... (a random variant when rng is given)."""
    return _pick(rng, _REGIONS[cell])


def find_cell(text: str) -> tuple[int | None, tuple[int, int] | None]:
    """The first grid position named in `text` and its character span, or (None, None)."""
    m = _POSITION.search(text)
    if not m:
        return None, None
    g = {k: (v.lower() if v else v) for k, v in m.groupdict().items()}
    if g["v"]:
        row, col = _VERT[g["v"]], _HORIZ[g["h"]]
    elif g["v2"] or g["v3"]:
        row, col = _VERT[g["v2"] or g["v3"]], 1
    elif g["h2"] or g["h3"] or g["h4"] or g["h5"]:
        row, col = 1, _HORIZ[g["h2"] or g["h3"] or g["h4"] or g["h5"]]
    else:
        row, col = 1, 1
    return row * 3 + col, m.span()


def find_label(text: str) -> tuple[str | None, tuple[int, int] | None]:
    m = _LABEL.search(text)
    return (m.group(1), m.span()) if m else (None, None)


def _cut(text: str, span: tuple[int, int] | None) -> str:
    return text if span is None else text[:span[0]] + " " + text[span[1]:]


def parse_object_phrase(text: str) -> Obj | None:
    """The partial object a phrase describes ('a small pale blue circle labelled K at the top left'), or
    None when it names no shape. The first word of each attribute class wins; unknown words are ignored."""
    label, span = find_label(text)
    text = _cut(text, span)
    cell, span = find_cell(text)
    text = _cut(text, span)
    found: dict[str, str] = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        field, value = LEXICON.get(word, (None, None))
        if field and field not in found:
            found[field] = value
    if "shape" not in found:
        return None
    if label and found.get("size") not in (None, *LABELLED_SIZES):
        label = None  # a small object cannot carry a label (scene.validate): the text contradicts itself
    return Obj(shape=found["shape"], hue=found.get("hue"), shade=found.get("shade"), size=found.get("size"),
               pattern=found.get("pattern"), label=label, cell=cell)


def parse_background(text: str) -> tuple[str | None, tuple[int, int] | None]:
    m = _BACKGROUND.search(text)
    return ((m.group("a") or m.group("b")).lower(), m.span()) if m else (None, None)


def parse_caption(text: str) -> Scene:
    """The partial scene a caption describes. Objects repeating an already used cell lose their cell (a
    simulator places them in a free one); objects beyond nine are ignored."""
    background = None
    objects: list[Obj] = []
    used: set[int] = set()
    for sentence in _SENTENCES.split(text or ""):
        for clause in _CLAUSES.split(sentence):
            bg, span = parse_background(clause)
            if bg:
                background = background or bg
                clause = _cut(clause, span)
            obj = parse_object_phrase(clause)
            if obj is None or len(objects) == 9:
                continue
            if obj.cell is not None and obj.cell in used:
                obj = Obj(**{**obj.__dict__, "cell": None})
            if obj.cell is not None:
                used.add(obj.cell)
            objects.append(obj)
    return Scene(background=background, objects=tuple(objects))


def object_phrase(obj: Obj, article_word: str = "the", fields: tuple[str, ...] = ("size", "colour", "shape"),
                  ) -> str:
    """A referring expression from the chosen fields that are known: 'the small light blue circle'.

    fields: any of size, colour, pattern, shape, label, position (in that order in the text)."""
    words = []
    if "size" in fields and obj.size:
        words.append(obj.size)
    if "colour" in fields and obj.colour:
        words.append(obj.colour)
    if "pattern" in fields and obj.pattern:
        words.append(obj.pattern)
    words.append(obj.shape if "shape" in fields and obj.shape else "shape")
    if article_word in ("a", "an"):
        article_word = article(words[0])
    text = " ".join([article_word, *words]) if article_word else " ".join(words)
    if "label" in fields and obj.label:
        text += f" labelled {obj.label}"
    if "position" in fields and obj.cell is not None:
        text += " " + region_phrase(obj.cell)
    return text


def kind_phrase(kind: Obj, plural: bool = True) -> str:
    """'light blue circles' / 'red squares' / 'stars': an object kind (shape, optional colour) in bare form."""
    words = [w for w in (kind.size, kind.colour, kind.pattern) if w]
    shape = kind.shape or "shape"
    return " ".join([*words, PLURALS.get(shape, shape + "s") if plural else shape])


def describe_object(obj: Obj, rng: np.random.Generator) -> str:
    """All of a complete object's attributes (not its position) with an indefinite article, e.g. 'a big
    striped circle in pale blue labelled "K"'."""
    size = _pick(rng, _SIZE_WORDS[obj.size]) if obj.size else None
    colour = f"{_pick(rng, _SHADE_WORDS[obj.shade])} {obj.hue}" if obj.shade and obj.hue else obj.hue
    colour_after = colour is not None and rng.random() < 0.25
    pattern_after = obj.pattern is not None and rng.random() < 0.35
    pre = [w for w in (size, None if colour_after else colour,
                       None if pattern_after or not obj.pattern else _pick(rng, _PATTERN_ADJ[obj.pattern])) if w]
    words = [*pre, obj.shape or "shape"]
    text = f"{article(words[0])} {' '.join(words)}"
    post = []
    if colour_after:
        post.append(f"in {colour}")
    if pattern_after:
        post.append(_pick(rng, _PATTERN_POST[obj.pattern]))
    if obj.label:
        post.append(_label_text(obj.label, rng))
    return " ".join([text, *post])


def _label_text(label: str, rng: np.random.Generator) -> str:
    frame = _pick(rng, _LABEL_POST)
    if frame == "marked with {}":
        return frame.format(("an " if label in "AEFHILMNORSX" else "a ") + label)
    return frame.format(label)


def frame_sentence(frame: str, desc: str, region: str) -> str:
    """One of the caption frames (_FRAMES) filled with an object's description and region phrase."""
    return frame.format(desc=desc, Desc=desc[0].upper() + desc[1:], region=region,
                        Region=region[0].upper() + region[1:])


def object_sentence(obj: Obj, rng: np.random.Generator) -> str:
    """One caption sentence about one object: its description and region in one of the caption frames."""
    desc = describe_object(obj, rng)
    region = region_phrase(obj.cell, rng) if obj.cell is not None else "somewhere"
    return frame_sentence(_pick(rng, _FRAMES), desc, region)


def caption(scene: Scene, rng: np.random.Generator, background_prob: float = 0.7, count_prob: float = 0.3) -> str:
    """A caption of a complete scene: one sentence per object in random order, varied frames and words."""
    sentences = []
    n = len(scene.objects)
    if n and rng.random() < count_prob:
        many = (f"The image shows {NUMBER_WORDS[n]} shapes.", f"There are {NUMBER_WORDS[n]} objects.")
        sentences.append("The image shows a single shape." if n == 1 else _pick(rng, many))
    sentences += [object_sentence(scene.objects[int(i)], rng) for i in rng.permutation(n)]
    if scene.background and rng.random() < background_prob:
        bg = _pick(rng, _BACKGROUND_FRAMES).format(bg=scene.background)
        sentences.insert(0 if rng.random() < 0.3 else len(sentences), bg)
    return " ".join(sentences)
