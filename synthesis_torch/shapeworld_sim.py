"""Simulated diffusion models for ShapeWorld (viper_common/shapeworld): the stage-1 text-to-image model and
the stage-2 editor, registered as "shapeworld" (`config.t2i.name`, `config.editor.name`). Plain NumPy + PIL.

Text-to-image (`ShapeWorldReconstructor`): like Qwen-Image, it redraws from the caption alone. The caption
is parsed (`language.parse_caption`), whatever it leaves unsaid is drawn at random from the given seed
(`scene.complete_scene`: attributes, free cells for objects without a position, and new jitter offsets for
every object), and the scene is rendered at the original image's size. It never sees the original image's
scene. A caption with no readable object gives a background-only image and the flag "no_objects" in its
report (caption_refine counts it as `t2i_no_objects`; the sample is kept, as with a real model).

Editor (`ShapeWorldEditor`): reads the input image's scene from its PNG metadata (EditorError if there is
none: stage 2 counts the reject "editor_error"), parses the instruction against that scene
(`edits.parse_instruction`), applies it and re-renders with the input's render seed, so everything the edit
does not touch keeps its pixels. Like a real editor it fails sometimes: with probability
`editor.failure_rate` an edit is either not applied (share 1 - `editor.wrong_object_share`) or applied to
another object of the scene (when the edit has a target and another object can take it). An instruction it
cannot resolve changes nothing. What it did is reported per instruction in `last_report` (outcome applied |
not_applied | wrong_object | not_understood), which stage 2 stores in the operation's log: diagnostics only,
never training truth. Outputs carry their scene and render seed in `image.info`, which stage 2 writes into
the edited PNG, so sequential edits chain. With `editor.closest_match` an object reference that matches no
object exactly goes to the object sharing the most stated attributes with it (`edits.resolve`), as a real
editor acts on the closest thing to what it was told; the report says `matched: closest`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image

from synthesis_torch.diffusion import register_reconstructor
from synthesis_torch.editors import EditorError, register_editor
from viper_common.shapeworld import edits, language, render
from viper_common.shapeworld.scene import Scene, SceneError, complete_scene

NAME = "shapeworld"
_SENTENCES = re.compile(r"(?<=[.!?])\s+")


def render_at(scene: Scene, seed: int, width: int, height: int) -> Image.Image:
    """The scene rendered at (width, height) (square scenes; other shapes are resized from the square),
    with the scene and seed in `image.info`."""
    side = width if width == height else max(8, round((width * height) ** 0.5))
    image = render.render(scene, seed, side)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return render.attach(image, scene, seed)


class ShapeWorldReconstructor:
    name = NAME
    path = NAME

    def __init__(self) -> None:
        self.last_reports: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, config: Any, device: Any = None, dtype: Any = None) -> "ShapeWorldReconstructor":
        return cls()

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "simulated": True}

    def size_for(self, image: Image.Image) -> tuple[int, int]:
        return image.width, image.height

    def render(self, captions: Sequence[str], sizes: Sequence[tuple[int, int]], seeds: Sequence[int]
               ) -> list[Image.Image]:
        out, self.last_reports = [], []
        for text, (w, h), seed in zip(captions, sizes, seeds):
            partial = language.parse_caption(text)
            # Offsets are drawn anew for every object, as a t2i model never reproduces exact positions.
            partial = Scene(partial.background,
                            tuple(dataclasses.replace(o, dx=None, dy=None) for o in partial.objects))
            scene = complete_scene(partial, np.random.default_rng([seed, 2]))
            out.append(render_at(scene, seed, w, h))
            self.last_reports.append({"objects_read": len(partial.objects), "objects_drawn": len(scene.objects),
                                      "background_read": partial.background is not None,
                                      "flags": [] if partial.objects else ["no_objects"]})
        return out


class ShapeWorldEditor:
    name = NAME

    def __init__(self, failure_rate: float = 0.0, wrong_object_share: float = 0.5, closest_match: bool = False):
        for key, value in (("failure_rate", failure_rate), ("wrong_object_share", wrong_object_share)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"editor.{key} must be in [0, 1], got {value}")
        self.failure_rate, self.wrong_object_share = failure_rate, wrong_object_share
        self.closest_match = closest_match
        self.last_report: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Any, device: Any = None, dtype: Any = None) -> "ShapeWorldEditor":
        e = config.editor
        return cls(float(e.failure_rate), float(e.wrong_object_share), bool(e.closest_match))

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "simulated": True, "failure_rate": self.failure_rate,
                "wrong_object_share": self.wrong_object_share, "closest_match": self.closest_match}

    def _wrong_object(self, scene: Scene, edit: edits.Edit, rng: np.random.Generator) -> Scene | None:
        """The edit applied to another object, or None if no other object can take it."""
        if edit.target is None:
            return None
        for other in rng.permutation(len(scene.objects)):
            if int(other) == edit.target:
                continue
            try:
                after = edits.apply_edit(scene, dataclasses.replace(edit, target=int(other)), rng)
            except edits.EditError:
                continue
            if after != scene:
                return after
        return None

    def _one(self, scene: Scene, text: str, rng: np.random.Generator) -> tuple[Scene, dict[str, Any]]:
        try:
            edit, loose = edits.parse_instruction(text, scene), {}
        except edits.EditParseError as e:
            not_understood = {"outcome": "not_understood", "detail": str(e)[:200]}
            if not self.closest_match:
                return scene, not_understood
            try:  # the strict reading failed: a loose reference may still name one object best
                edit, loose = edits.parse_instruction(text, scene, closest=True), {"matched": "closest"}
            except edits.EditParseError:
                return scene, not_understood
        if rng.random() < self.failure_rate:
            wrong = self._wrong_object(scene, edit, rng) if rng.random() < self.wrong_object_share else None
            if wrong is not None:
                return wrong, {"outcome": "wrong_object", "op": edit.op, **loose}
            return scene, {"outcome": "not_applied", "op": edit.op, **loose}
        return edits.apply_edit(scene, edit, rng), {"outcome": "applied", "op": edit.op, **loose}

    def edit(self, image: Image.Image, instruction: str, seed: int) -> Image.Image:
        try:
            scene = render.read_scene(image)
            render_seed = render.read_seed(image)
        except SceneError as e:
            raise EditorError(f"shapeworld editor: the input image's scene metadata is malformed: {e}") from None
        if scene is None:
            raise EditorError(f"shapeworld editor: the input image has no '{render.SCENE_KEY}' metadata; it can "
                              "only edit images rendered by viper_common.shapeworld (PNG with the scene)")
        rng = np.random.default_rng([seed, 3])
        # Combined mode joins several instructions into one text: each sentence is applied in turn.
        pieces = _SENTENCES.split(instruction.strip()) or [instruction]
        reports = []
        for piece in pieces:
            scene, report = self._one(scene, piece, rng)
            reports.append(report)
        self.last_report = reports[0] if len(reports) == 1 else {"outcome": "combined", "parts": reports}
        seed_used = render_seed if render_seed is not None else seed
        return render_at(scene, seed_used, image.width, image.height)


register_reconstructor(NAME, ShapeWorldReconstructor.from_config)
register_editor(NAME, ShapeWorldEditor.from_config)
