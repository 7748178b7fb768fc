"""ShapeWorld edit operations in the project's taxonomy, and their instruction text in both directions.

Operations (`Edit.op`), with the fields each uses:
- attribute: target, attribute (hue | shade | size | pattern), value. A hue change keeps the shade; making
  a labelled object small drops its label (small objects carry none).
- add: obj, the new object (unstated attributes are drawn by `apply_edit`'s rng; cell None = a free cell).
- remove: target.   move: target, cell (a free cell).
- replace: target, obj (the replacement's stated attributes; the rest, and the place, come from the target).
- count: kind (shape and optional colour/size/pattern), count: copies of the first object of that kind are
  added in free cells, or the last objects of that kind are removed, until there are `count`.
- text: target, value (the new label letter; "" removes the label).

`instruction(edit, scene, rng)` writes '<type>: <instruction>' (the line form synthesis_torch.parsing
.parse_edit_ops reads); objects are named by a short referring expression that is unique in the scene.
`parse_instruction(text, scene)` reads an instruction with or without the '<type>:' prefix (an editor gets
the bare instruction) and resolves it against the scene, raising EditParseError when it cannot: no frame
matches, no object or several match a reference, or the edit is impossible or changes nothing.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from viper_common.shapeworld.language import (LEXICON, NUMBER_WORDS, describe_object, find_cell,
                                              kind_phrase, object_phrase, parse_object_phrase, region_phrase)
from viper_common.shapeworld.scene import (HUES, JITTER, LABELLED_SIZES, LABELS, PATTERNS, SHADES, SHAPES, SIZES,
                                           Obj, Scene, sample_object)

OPS = ("attribute", "add", "remove", "replace", "move", "count", "text")
OP_TYPES = OPS  # the same taxonomy as synthesis_torch.config.OP_TYPES
ATTRIBUTES = {"hue": HUES, "shade": SHADES, "size": SIZES, "pattern": PATTERNS}
_ATTRIBUTE_NAMES = {"hue": "colour", "shade": "shade", "size": "size", "pattern": "pattern"}
_ATTRIBUTE_BY_NAME = {"colour": "hue", "color": "hue", "shade": "shade", "size": "size", "pattern": "pattern",
                      "fill": "pattern"}
_PREFIX = re.compile(r"^\W*([A-Za-z]+)\W*?\s*:\s*(.+)$", re.DOTALL)
_PREFIX_ALIASES = ("color", "colour", "delete", "addition", "removal", "number", "swap", "position")


class EditError(ValueError):
    """An edit that cannot be applied to a scene."""


class EditParseError(EditError):
    """Instruction text that cannot be resolved against a scene; the message says why."""


@dataclasses.dataclass(frozen=True)
class Edit:
    op: str
    target: int | None = None
    attribute: str | None = None
    value: str | None = None
    obj: Obj | None = None
    cell: int | None = None
    kind: Obj | None = None
    count: int | None = None


def matches(obj: Obj, partial: Obj) -> bool:
    """True if every attribute `partial` states (except dx/dy) equals `obj`'s."""
    return all(getattr(partial, f) is None or getattr(partial, f) == getattr(obj, f)
               for f in ("shape", "hue", "shade", "size", "pattern", "label", "cell"))


_MATCH_FIELDS = ("shape", "hue", "shade", "size", "pattern", "label", "cell")
MIN_CLOSEST_AGREEMENT = 2  # stated attributes a closest match must share with the object


def resolve(scene: Scene, phrase: str, closest: bool = False) -> int:
    """Index of the one object `phrase` refers to; EditParseError if none or several. `closest`: as an image
    editor takes a loose description, the object sharing the most stated attributes with it (at least
    MIN_CLOSEST_AGREEMENT, and more than any other object) when no object matches exactly."""
    ref = parse_object_phrase(phrase)
    if ref is None:
        raise EditParseError(f"no shape named in {phrase!r}")
    hits = [i for i, o in enumerate(scene.objects) if matches(o, ref)]
    if not hits and closest and scene.objects:
        agree = [sum(getattr(ref, f) is not None and getattr(ref, f) == getattr(o, f) for f in _MATCH_FIELDS)
                 for o in scene.objects]
        best = max(agree)
        if best >= MIN_CLOSEST_AGREEMENT and agree.count(best) == 1:
            return agree.index(best)
    if not hits:
        raise EditParseError(f"no object in the scene is {phrase!r}")
    if len(hits) > 1:
        raise EditParseError(f"{phrase!r} is ambiguous: {len(hits)} objects match")
    return hits[0]


_REF_FIELDS = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"),
               ("colour", "pattern", "shape"), ("size", "colour", "pattern", "shape"),
               ("shape", "position"), ("colour", "shape", "position"))


def _partial(obj: Obj, fields: tuple[str, ...]) -> Obj:
    return Obj(shape=obj.shape, hue=obj.hue if "colour" in fields else None,
               shade=obj.shade if "colour" in fields else None, size=obj.size if "size" in fields else None,
               pattern=obj.pattern if "pattern" in fields else None, cell=obj.cell if "position" in fields else None)


def refer(scene: Scene, index: int, rng: np.random.Generator) -> str:
    """A short referring expression for object `index` that no other object in the scene matches."""
    obj = scene.objects[index]
    unique = [f for f in _REF_FIELDS
              if [i for i, o in enumerate(scene.objects) if matches(o, _partial(obj, f))] == [index]]
    return object_phrase(obj, "the", unique[int(rng.integers(min(3, len(unique))))])


def _destination(cell: int, rng: np.random.Generator) -> str:
    return re.sub(r"^(at|in|on|along) ", "", region_phrase(cell, rng))


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def instruction(edit: Edit, scene: Scene, rng: np.random.Generator, ref: str | None = None) -> str:
    """'<type>: <Instruction>.' for an edit of `scene`, in one of several phrasings. `ref` names the target
    (default: a short referring expression that is unique in the scene)."""
    if ref is None:
        ref = refer(scene, edit.target, rng) if edit.target is not None else ""
    if edit.op == "attribute":
        frames = ["make {ref} {v}", "change the {name} of {ref} to {v}", "turn {ref} {v}"]
        frames += ["paint {ref} {v}"] if edit.attribute == "hue" else []
        text = _pick(rng, tuple(frames)).format(ref=ref, v=edit.value, name=_ATTRIBUTE_NAMES[edit.attribute])
    elif edit.op == "add":
        obj = edit.obj
        where = f" {region_phrase(obj.cell, rng)}" if obj.cell is not None else ""
        text = f"{_pick(rng, ('add', 'put', 'place', 'draw'))} {describe_object(obj, rng)}{where}"
    elif edit.op == "remove":
        text = f"{_pick(rng, ('remove', 'delete', 'erase', 'take away'))} {ref}"
    elif edit.op == "replace":
        new = describe_object(edit.obj, rng)
        text = _pick(rng, ("replace {ref} with {new}", "swap {ref} for {new}", "turn {ref} into {new}",
                           "change {ref} into {new}")).format(ref=ref, new=new)
    elif edit.op == "move":
        text = f"{_pick(rng, ('move', 'shift', 'slide'))} {ref} to {_destination(edit.cell, rng)}"
    elif edit.op == "count":
        kind, n = kind_phrase(edit.kind, plural=edit.count != 1), NUMBER_WORDS[edit.count]
        text = _pick(rng, ("change the number of {pl} to {n}", "there should be {n} {k}",
                           "make it so that there are {n} {k}")).format(pl=kind_phrase(edit.kind), n=n, k=kind)
    elif edit.op == "text" and edit.value:
        text = _pick(rng, ("change the label of {ref} to {v}", "write the letter {v} on {ref}",
                           "label {ref} with the letter {v}")).format(ref=ref, v=edit.value)
    elif edit.op == "text":
        text = _pick(rng, ("remove the label from {ref}", "erase the letter on {ref}")).format(ref=ref)
    else:
        raise EditError(f"unknown edit op {edit.op!r}; known: {OPS}")
    return f"{edit.op}: {_sentence(text)}"


# Instruction frames per op, tried in this order (text before remove, replace before attribute: their
# frames overlap). Matched case-insensitively against the instruction without its final punctuation.
_FRAMES: dict[str, tuple[str, ...]] = {
    "text": (r"(?:change|replace|set) the (?:label|letter) (?:of|on) (?P<ref>.+?) (?:to|with) (?:the letter )?"
             r"[\"']?(?P<letter>[a-z])[\"']?",
             r"write (?:the letter |a |an )?[\"']?(?P<letter>[a-z])[\"']? on (?P<ref>.+)",
             r"label (?P<ref>.+?) with (?:the letter |a |an )?[\"']?(?P<letter>[a-z])[\"']?",
             r"(?:remove|erase|delete) the (?:label|letter) (?:from|on|of) (?P<ref>.+)"),
    "count": (r"change the number of (?P<kind>.+?) to (?P<n>\w+)",
              r"there should be (?P<n>\w+) (?P<kind>.+)", r"make it so that there (?:are|is) (?P<n>\w+) (?P<kind>.+)"),
    "add": (r"(?:add|put|place|draw|insert) (?:an?|one) (?P<new>.+)",),
    "remove": (r"(?:remove|delete|erase|take away|get rid of) (?P<ref>.+)",),
    "replace": (r"replace (?P<ref>.+?) with (?:an?|one) (?P<new>.+)", r"swap (?P<ref>.+?) for (?:an?|one) (?P<new>.+)",
                r"(?:turn|change) (?P<ref>.+?) into (?:an?|one) (?P<new>.+)"),
    "move": (r"(?:move|shift|slide|drag) (?P<ref>.+) (?:over )?to (?P<dest>.+)",),
    "attribute": (r"change the (?P<name>colou?r|shade|size|pattern|fill) of (?P<ref>.+?) to (?:be )?(?:an? )?"
                  r"(?P<v>\w+)",
                  # "make the cross blue", "change the cross (to) light blue": a shade before a colour is
                  # dropped (one edit changes one attribute; the colour is the change asked for)
                  r"(?:make|turn|paint|recolou?r) (?P<ref>.+?) (?:(?:light|pale|dark|deep) )?(?P<v>\w+)",
                  r"change (?P<ref>.+?) (?:to )?(?:(?:light|pale|dark|deep) )?(?P<v>\w+)"),
}
_ORDER = ("text", "count", "add", "replace", "move", "attribute", "remove")


def _number(word: str) -> int:
    word = word.lower()
    if word.isdigit():
        return int(word)
    if word in NUMBER_WORDS:
        return NUMBER_WORDS.index(word)
    raise EditParseError(f"{word!r} is not a number")


def _new_object(text: str, *, cell_allowed: bool) -> Obj:
    obj = parse_object_phrase(text)
    if obj is None:
        raise EditParseError(f"no shape named in {text!r}")
    return dataclasses.replace(obj, label=obj.label or "", cell=obj.cell if cell_allowed else None)


def _from_match(op: str, m: re.Match, scene: Scene, closest: bool = False) -> Edit:
    g = m.groupdict()

    def target(phrase: str) -> int:
        return resolve(scene, phrase, closest)

    if op == "text":
        return Edit("text", target=target(g["ref"]), value=(g.get("letter") or "").upper())
    if op == "count":
        kind = parse_object_phrase(g["kind"])
        if kind is None:
            raise EditParseError(f"no shape named in {g['kind']!r}")
        return Edit("count", kind=dataclasses.replace(kind, label=None, cell=None), count=_number(g["n"]))
    if op == "add":
        return Edit("add", obj=_new_object(g["new"], cell_allowed=True))
    if op == "remove":
        return Edit("remove", target=target(g["ref"]))
    if op == "replace":
        return Edit("replace", target=target(g["ref"]), obj=_new_object(g["new"], cell_allowed=False))
    if op == "move":
        cell, _ = find_cell(g["dest"])
        if cell is None:
            raise EditParseError(f"no position named in {g['dest']!r}")
        return Edit("move", target=target(g["ref"]), cell=cell)
    field, value = LEXICON.get(g["v"].lower(), (None, None))
    if field not in ATTRIBUTES:
        raise EditParseError(f"{g['v']!r} is not a colour, shade, size or pattern")
    named = _ATTRIBUTE_BY_NAME.get((g.get("name") or "").lower())
    if named and named != field:
        raise EditParseError(f"{g['v']!r} is not a {g['name']}")
    return Edit("attribute", target=target(g["ref"]), attribute=field, value=value)


def parse_instruction(text: str, scene: Scene, closest: bool = False) -> Edit:
    """The edit an instruction asks for, resolved against `scene` (see the module docstring); `closest`
    resolves object references as `resolve` does with it."""
    body = " ".join((text or "").split())
    m = _PREFIX.match(body)
    if m and (m.group(1).lower() in OPS or m.group(1).lower() in _PREFIX_ALIASES):
        body = m.group(2)  # the type is not trusted: an editor sees only the instruction, and frames decide
    body = body.strip().rstrip(".!").strip().strip("\"'").strip()
    if not body:
        raise EditParseError("empty instruction")
    for op in _ORDER:
        for frame in _FRAMES[op]:
            match = re.fullmatch(frame, body, re.IGNORECASE)
            if match:  # the first matching frame decides: a fallback could misread "remove the label from X"
                edit = _from_match(op, match, scene, closest)
                check(scene, edit)
                return edit
    raise EditParseError(f"no edit frame matches {text!r}")


def check(scene: Scene, edit: Edit) -> None:
    """EditParseError if `edit` is impossible on `scene` or would change nothing."""
    try:
        after = apply_edit(scene, edit)
    except EditError as e:
        raise EditParseError(str(e)) from None
    if after == scene:
        raise EditParseError(f"the {edit.op} edit changes nothing in this scene")


def _free_cells(scene: Scene) -> list[int]:
    taken = {o.cell for o in scene.objects}
    return [c for c in range(9) if c not in taken]


def _offset(rng: np.random.Generator | None) -> float:
    return 0.0 if rng is None else round(float(rng.uniform(-JITTER, JITTER)), 3)


def apply_edit(scene: Scene, edit: Edit, rng: np.random.Generator | None = None) -> Scene:
    """The scene after `edit`. `rng` draws what the edit leaves open (an added object's unstated
    attributes, free cells, new offsets); without it the choices are fixed (first free cell, centred)."""
    objs = list(scene.objects)
    if edit.target is not None and not 0 <= edit.target < len(objs):
        raise EditError(f"edit target {edit.target} is not an object index (scene has {len(objs)})")
    target = objs[edit.target] if edit.target is not None else None
    if edit.op == "attribute":
        if edit.attribute not in ATTRIBUTES or edit.value not in ATTRIBUTES[edit.attribute]:
            raise EditError(f"bad attribute edit {edit.attribute}={edit.value!r}")
        new = dataclasses.replace(target, **{edit.attribute: edit.value})
        if new.size not in LABELLED_SIZES:
            new = dataclasses.replace(new, label="")
        objs[edit.target] = new
    elif edit.op == "add":
        free = _free_cells(scene)
        cell = edit.obj.cell if edit.obj.cell is not None else (
            (int(rng.choice(free)) if rng is not None else free[0]) if free else None)
        if cell is None or cell not in free:
            raise EditError(f"cannot add an object: {'the grid is full' if not free else 'that place is taken'}")
        base = sample_object(rng, cell, 0.0) if rng is not None else Obj(
            shape=SHAPES[0], hue=HUES[0], shade=SHADES[0], size="medium", pattern="solid", label="", cell=cell,
            dx=0.0, dy=0.0)
        stated = {k: v for k, v in dataclasses.asdict(edit.obj).items() if v is not None and k != "cell"}
        objs.append(dataclasses.replace(base, **stated))
    elif edit.op == "remove":
        del objs[edit.target]
    elif edit.op == "replace":
        stated = {k: v for k, v in dataclasses.asdict(edit.obj).items()
                  if v is not None and k not in ("cell", "dx", "dy")}
        objs[edit.target] = dataclasses.replace(target, **stated)
    elif edit.op == "move":
        if edit.cell not in _free_cells(scene):
            raise EditError(f"cannot move to cell {edit.cell}: it is taken")
        objs[edit.target] = dataclasses.replace(target, cell=edit.cell)
    elif edit.op == "count":
        same = [i for i, o in enumerate(objs) if matches(o, edit.kind)]
        n = edit.count if edit.count is not None else -1
        if n < 0 or n > 9:
            raise EditError(f"count {edit.count} is not in 0..9")
        if n > len(same):
            free = _free_cells(scene)
            if not same:
                raise EditError(f"there are no {kind_phrase(edit.kind)} to copy")
            if n - len(same) > len(free):
                raise EditError(f"no room for {n} {kind_phrase(edit.kind)}: {len(free)} free places")
            extra = n - len(same)
            cells = free[:extra] if rng is None else sorted(int(c) for c in rng.choice(free, extra, replace=False))
            objs += [dataclasses.replace(objs[same[0]], label="", cell=c, dx=_offset(rng), dy=_offset(rng))
                     for c in cells]
        else:
            drop = set(same[n:])
            objs = [o for i, o in enumerate(objs) if i not in drop]
    elif edit.op == "text":
        if edit.value and target.size not in LABELLED_SIZES:
            raise EditError(f"a {target.size} object cannot carry a label")
        objs[edit.target] = dataclasses.replace(target, label=edit.value or "")
    else:
        raise EditError(f"unknown edit op {edit.op!r}; known: {OPS}")
    return Scene(scene.background, tuple(objs))


def _other(rng: np.random.Generator, choices: tuple[str, ...], current: str | None) -> str:
    return str(rng.choice([c for c in choices if c != current]))


def random_edit(scene: Scene, rng: np.random.Generator, op_type: str | None = None, target: int | None = None
                ) -> Edit:
    """A random edit of `op_type` (any op when None) that changes `scene`; EditError if none is possible.
    `target` fixes the object edited (default: drawn); a text edit on an object too small for a label, or an
    add, cannot take one."""
    op = op_type or str(rng.choice(OPS))
    n, free = len(scene.objects), _free_cells(scene)
    if op in ("attribute", "remove", "replace", "move", "text", "count") and not n:
        raise EditError(f"a {op} edit needs an object; the scene is empty")
    target_given = target is not None
    if target is None:
        target = int(rng.integers(n)) if n else None
    elif op == "add" or not 0 <= target < n:
        raise EditError(f"an {op} edit cannot target object {target} (scene has {n})")
    if op == "attribute":
        attribute = str(rng.choice(tuple(ATTRIBUTES)))
        return Edit("attribute", target=target, attribute=attribute,
                    value=_other(rng, ATTRIBUTES[attribute], getattr(scene.objects[target], attribute)))
    if op == "add":
        if not free:
            raise EditError("the grid is full")
        obj = sample_object(rng, int(rng.choice(free)))
        return Edit("add", obj=dataclasses.replace(obj, dx=None, dy=None,
                                                   cell=obj.cell if rng.random() < 0.8 else None))
    if op == "remove":
        return Edit("remove", target=target)
    if op == "replace":
        old = scene.objects[target]
        new = Obj(shape=_other(rng, SHAPES, old.shape), label="")
        if rng.random() < 0.5:
            new = dataclasses.replace(new, hue=_other(rng, HUES, old.hue), shade=str(rng.choice(SHADES)))
        if rng.random() < 0.3:
            new = dataclasses.replace(new, size=str(rng.choice(SIZES)), pattern=str(rng.choice(PATTERNS)))
        return Edit("replace", target=target, obj=new)
    if op == "move":
        if not free:
            raise EditError("no free place to move to")
        return Edit("move", target=target, cell=int(rng.choice(free)))
    if op == "count":
        obj = scene.objects[target]
        kind = Obj(shape=obj.shape, hue=obj.hue if rng.random() < 0.5 else None)
        kind = dataclasses.replace(kind, shade=obj.shade) if kind.hue and rng.random() < 0.5 else kind
        have = sum(matches(o, kind) for o in scene.objects)
        options = [c for c in range(1, have + len(free) + 1) if c != have]
        if not options:
            raise EditError("no other count is possible")
        return Edit("count", kind=kind, count=int(rng.choice(options)))
    if op == "text":
        labelled = [i for i, o in enumerate(scene.objects) if o.size in LABELLED_SIZES]
        if not labelled:
            raise EditError("no object is big enough to carry a label")
        if target_given:
            if target not in labelled:
                raise EditError(f"object {target} is too small to carry a label")
        else:
            target = int(rng.choice(labelled))
        current = scene.objects[target].label
        value = "" if current and rng.random() < 0.3 else _other(rng, LABELS, current)
        return Edit("text", target=target, value=value)
    raise EditError(f"unknown edit op {op!r}; known: {OPS}")


__all__ = ["OPS", "OP_TYPES", "ATTRIBUTES", "Edit", "EditError", "EditParseError", "apply_edit", "check", "instruction",
           "matches", "parse_instruction", "random_edit", "refer", "resolve"]
