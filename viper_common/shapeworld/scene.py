"""ShapeWorld scenes: a few objects on a background, as a small typed structure with a JSON form.

The world exists so that perception can be measured: the scene graph is the truth about an image. Only the
simulated diffusion models (synthesis side), the benchmark and diagnostics may read it; the learner never
sees it (shared/reference/shapeworld_notes.md).

Coarse attributes: shape, hue, size class, position (one cell of a 3x3 grid, jittered inside the cell).
Fine attributes, chosen to be hard for a small model at 112-140 px: the shade of the hue (light / dark, a
close-colour pair), the fill pattern (solid, striped, dotted, outlined) and an optional one-letter label.
Objects sit in distinct grid cells, so every object has a unique position name and spatial relations
between objects are unambiguous.

A *partial* scene (what a parsed caption describes) has `None` in any attribute the text did not give;
`Scene.is_complete()` tells them apart.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
HUES = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "gray")
SHADES = ("light", "dark")
SIZES = ("small", "medium", "large")
PATTERNS = ("solid", "striped", "dotted", "outlined")
LABELS = ("A", "E", "H", "K", "M", "R", "T", "X")
BACKGROUNDS = ("white", "cream", "silver", "black", "navy")
# Cells of the 3x3 grid, row-major from the top left; names as a caption says them.
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")

# RGB of each (hue, shade): the two shades of a hue are close on purpose (a fine-grained distinction).
COLOUR_RGB: dict[tuple[str, str], tuple[int, int, int]] = {
    ("red", "light"): (235, 90, 85), ("red", "dark"): (170, 30, 30),
    ("orange", "light"): (250, 170, 80), ("orange", "dark"): (205, 105, 20),
    ("yellow", "light"): (250, 235, 120), ("yellow", "dark"): (205, 175, 20),
    ("green", "light"): (110, 205, 110), ("green", "dark"): (30, 120, 45),
    ("blue", "light"): (100, 150, 240), ("blue", "dark"): (25, 55, 165),
    ("purple", "light"): (185, 130, 225), ("purple", "dark"): (105, 40, 150),
    ("pink", "light"): (250, 170, 205), ("pink", "dark"): (210, 70, 140),
    ("gray", "light"): (180, 180, 180), ("gray", "dark"): (90, 90, 90),
}
BACKGROUND_RGB = {"white": (245, 245, 245), "cream": (240, 230, 200), "silver": (200, 205, 212),
                  "black": (20, 20, 22), "navy": (20, 28, 70)}
# Object diameter as a fraction of the image side (before the renderer's per-object jitter).
SIZE_FRACTION = {"small": 0.10, "medium": 0.18, "large": 0.27}
# Labels are drawn only on objects at least this big: a letter on a small object would be illegible.
LABELLED_SIZES = ("medium", "large")
MAX_OBJECTS = 5
JITTER = 0.22  # largest offset of an object's centre from its cell centre, in cell widths


class SceneError(ValueError):
    """A scene (or its JSON) breaks the schema; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object. Every attribute may be None in a partial scene (not stated by a caption).

    cell: 0..8, index into CELLS. dx, dy: offset of the centre from the cell centre, in cell widths, within
    [-JITTER, JITTER] (None = cell centre). label: one letter of LABELS or "" for no label (None: unknown).
    """

    shape: str | None = None
    hue: str | None = None
    shade: str | None = None
    size: str | None = None
    pattern: str | None = None
    label: str | None = None
    cell: int | None = None
    dx: float | None = None
    dy: float | None = None

    def is_complete(self) -> bool:
        return all(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    @property
    def colour(self) -> str | None:
        """'light blue' / 'blue' (shade unknown) / None."""
        if self.hue is None:
            return None
        return f"{self.shade} {self.hue}" if self.shade else self.hue

    @property
    def position(self) -> str | None:
        return None if self.cell is None else CELLS[self.cell]

    @property
    def row_col(self) -> tuple[int, int] | None:
        return None if self.cell is None else divmod(self.cell, 3)


_CHOICES = {"shape": SHAPES, "hue": HUES, "shade": SHADES, "size": SIZES, "pattern": PATTERNS,
            "label": LABELS + ("",)}


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str | None
    objects: tuple[Obj, ...]

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        validate(self)

    def is_complete(self) -> bool:
        return self.background is not None and all(o.is_complete() for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [dataclasses.asdict(o) for o in self.objects]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> "Scene":
        if not isinstance(data, dict) or "objects" not in data or not isinstance(data["objects"], list):
            raise SceneError("scene JSON must be an object with an 'objects' list")
        names = {f.name for f in dataclasses.fields(Obj)}
        objs = []
        for i, o in enumerate(data["objects"]):
            if not isinstance(o, dict) or set(o) - names:
                raise SceneError(f"objects[{i}]: unknown or malformed fields {sorted(set(o) - names) if isinstance(o, dict) else o!r}")
            objs.append(Obj(**o))
        return cls(background=data.get("background"), objects=tuple(objs))

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SceneError(f"scene metadata is not JSON: {e}") from None

    def replace_object(self, index: int, obj: Obj) -> "Scene":
        objs = list(self.objects)
        objs[index] = obj
        return Scene(self.background, tuple(objs))

    def object_at(self, cell: int) -> int | None:
        """Index of the object in `cell`, or None."""
        return next((i for i, o in enumerate(self.objects) if o.cell == cell), None)


def validate(scene: Scene) -> None:
    if scene.background is not None and scene.background not in BACKGROUNDS:
        raise SceneError(f"background {scene.background!r} is not one of {BACKGROUNDS}")
    if len(scene.objects) > 9:
        raise SceneError(f"{len(scene.objects)} objects; the 3x3 grid holds at most 9")
    cells = [o.cell for o in scene.objects if o.cell is not None]
    if len(cells) != len(set(cells)):
        raise SceneError(f"two objects share a grid cell: {sorted(cells)}")
    for i, o in enumerate(scene.objects):
        if not isinstance(o, Obj):
            raise SceneError(f"objects[{i}] is {type(o).__name__}, not Obj")
        for name, allowed in _CHOICES.items():
            value = getattr(o, name)
            if value is not None and value not in allowed:
                raise SceneError(f"objects[{i}].{name} = {value!r} is not one of {allowed}")
        if o.cell is not None and (not isinstance(o.cell, int) or not 0 <= o.cell < 9):
            raise SceneError(f"objects[{i}].cell = {o.cell!r} is not in 0..8")
        for name in ("dx", "dy"):
            v = getattr(o, name)
            if v is not None and not (isinstance(v, (int, float)) and abs(v) <= JITTER + 1e-9):
                raise SceneError(f"objects[{i}].{name} = {v!r} is outside [-{JITTER}, {JITTER}]")
        if o.label and o.size is not None and o.size not in LABELLED_SIZES:
            raise SceneError(f"objects[{i}] is {o.size} but labelled {o.label!r}: only {LABELLED_SIZES} carry labels")


def sample_object(rng: np.random.Generator, cell: int, label_prob: float = 0.4) -> Obj:
    size = str(rng.choice(SIZES))
    label = str(rng.choice(LABELS)) if size in LABELLED_SIZES and rng.random() < label_prob else ""
    return Obj(shape=str(rng.choice(SHAPES)), hue=str(rng.choice(HUES)), shade=str(rng.choice(SHADES)), size=size,
               pattern=str(rng.choice(PATTERNS)), label=label, cell=int(cell),
               dx=round(float(rng.uniform(-JITTER, JITTER)), 3), dy=round(float(rng.uniform(-JITTER, JITTER)), 3))


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = MAX_OBJECTS,
                 label_prob: float = 0.4) -> Scene:
    """A random complete scene: 1..max_objects objects in distinct cells."""
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    return Scene(background=str(rng.choice(BACKGROUNDS)),
                 objects=tuple(sample_object(rng, c, label_prob) for c in cells))


def complete_scene(partial: Scene, rng: np.random.Generator, label_prob: float = 0.4) -> Scene:
    """Fills every unknown attribute of a partial scene at random (what a text-to-image model does with what
    a caption leaves unsaid); objects without a cell go to free cells (dropped if none is left)."""
    free = [c for c in range(9) if c not in {o.cell for o in partial.objects}]
    rng.shuffle(free)
    objs = []
    for o in partial.objects:
        cell = o.cell if o.cell is not None else (free.pop() if free else None)
        if cell is None:
            continue
        r = sample_object(rng, cell, label_prob)
        size = o.size or r.size
        label = o.label if o.label is not None else (r.label if size in LABELLED_SIZES else "")
        if label and size not in LABELLED_SIZES:
            label = ""
        objs.append(Obj(shape=o.shape or r.shape, hue=o.hue or r.hue, shade=o.shade or r.shade, size=size,
                        pattern=o.pattern or r.pattern, label=label, cell=cell,
                        dx=o.dx if o.dx is not None else r.dx, dy=o.dy if o.dy is not None else r.dy))
    return Scene(background=partial.background or str(rng.choice(BACKGROUNDS)), objects=tuple(objs))
