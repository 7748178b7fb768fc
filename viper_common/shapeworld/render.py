"""ShapeWorld renderer: scene + seed -> an anti-aliased RGB image, and the PNG that carries the scene.

Drawing happens at SUPERSAMPLE times the output size and is box-downscaled (an area average: clean
anti-aliased edges, and a sub-pixel stripe or letter stroke becomes a blend, as in a photo of a small thing).
The seed drives the background's gradient and grain and each object's small size jitter; the scene drives
everything else, so the same scene and seed always give the same pixels. An object's size jitter is seeded
by (seed, cell), so editing one object leaves every other object's pixels unchanged.

Geometry: the image is a 3x3 grid; an object's centre is its cell centre plus (dx, dy) cell widths, its
diameter SIZE_FRACTION[size] of the image side (times a jitter in [0.92, 1.08]).

Fill patterns, on purpose fine at 112 px (a small object is about 11 px across):
- solid: the colour;  outlined: a ring of the colour (about 15 % of the diameter), hollow;
- striped: diagonal stripes of the colour over a pale tint of it;  dotted: dots of the colour over the tint.
A label is a letter about 45 % of the diameter tall, black or white, whichever contrasts with what is under it.

The PNG form (`to_png`) stores the scene JSON in a tEXt chunk SCENE_KEY and the render seed in SEED_KEY, so
the simulated editor can re-render an edited scene with the same background and jitters. Only the
simulators, the benchmark and diagnostics may read them (`read_scene`); the learner never does.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont, PngImagePlugin

from viper_common.shapeworld.scene import (BACKGROUND_RGB, COLOUR_RGB, SIZE_FRACTION, Obj, Scene, SceneError)

SUPERSAMPLE = 4
SCENE_KEY = "shapeworld_scene"
SEED_KEY = "shapeworld_seed"
OUTLINE_FRACTION = 0.15  # ring width of an outlined object, as a share of its diameter
LABEL_FRACTION = 0.45  # letter height, as a share of the object's diameter
TINT = 0.6  # how far the background tint of striped/dotted objects is mixed towards white


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Outline of `shape` around (0, 0) with radius about 1 (y down); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.8
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "diamond":
        return [(0, -1), (0.78, 0), (0, 1), (-0.78, 0)]
    if shape == "triangle":  # equilateral, pointing up, centred on its bounding box
        pts = [(math.cos(a), math.sin(a)) for a in (math.radians(-90), math.radians(30), math.radians(150))]
        return [(x * 1.1, y * 1.1 + 0.14) for x, y in pts]
    if shape == "star":
        return [((1.0 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
                 (1.0 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k)) + 0.05) for k in range(10)]
    if shape == "cross":
        a, w = 0.95, 0.32
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
                (-w, -w)]
    raise SceneError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, side: int, radius: float) -> Image.Image:
    """An L-mode mask of `shape` centred in a side x side tile."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    c = side / 2
    poly = _unit_polygon(shape)
    if poly is None:
        draw.ellipse([c - radius, c - radius, c + radius, c + radius], fill=255)
    else:
        draw.polygon([(c + x * radius, c + y * radius) for x, y in poly], fill=255)
    return mask


def _erode(mask: Image.Image, width: int) -> Image.Image:
    """The mask shrunk by about `width` pixels (repeated 3x3 minimum filters keep it cheap)."""
    for _ in range(max(1, width)):
        mask = mask.filter(ImageFilter.MinFilter(3))
    return mask


def _tint(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(round(v + (255 - v) * TINT)) for v in rgb)  # type: ignore[return-value]


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _pattern_fill(pattern: str, rgb: tuple[int, int, int], side: int, diameter: float) -> Image.Image:
    """The fill of a side x side tile: the colour, or stripes / dots of it over its tint."""
    if pattern in ("solid", "outlined"):
        return Image.new("RGB", (side, side), rgb)
    tile = Image.new("RGB", (side, side), _tint(rgb))
    draw = ImageDraw.Draw(tile)
    period = max(4.0, diameter / 4.5)
    if pattern == "striped":  # diagonal stripes, half the period wide
        half = period / 2
        for k in range(-int(2 * side / period) - 2, int(2 * side / period) + 2):
            x0 = k * period
            draw.polygon([(x0, 0), (x0 + half, 0), (x0 + half + side, side), (x0 + side, side)], fill=rgb)
    elif pattern == "dotted":  # a staggered grid of dots
        r = period * 0.3
        for row, y in enumerate(np.arange(period / 2, side, period * 0.87)):
            shift = period / 2 if row % 2 else 0.0
            for x in np.arange(period / 4 + shift, side, period):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
    else:
        raise SceneError(f"unknown pattern {pattern!r}")
    return tile


def _background(scene: Scene, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """The background colour with a soft seeded gradient and a faint grain (so no two images are equal)."""
    base = np.asarray(BACKGROUND_RGB[scene.background or "white"], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * (xx / w - 0.5) + np.sin(angle) * (yy / h - 0.5))  # in [-0.71, 0.71]
    amplitude = rng.uniform(8.0, 16.0) * (1 if base.mean() < 128 else -1)
    grain = rng.normal(0.0, 2.5, size=(h // SUPERSAMPLE + 1, w // SUPERSAMPLE + 1)).astype(np.float32)
    grain = np.kron(grain, np.ones((SUPERSAMPLE, SUPERSAMPLE), np.float32))[:h, :w]
    pixels = base[None, None, :] + (amplitude * ramp + grain)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(4, px))


def object_centre(obj: Obj, side_px: float) -> tuple[float, float]:
    """(x, y) of the object's centre in an image side_px wide: its grid cell's centre plus its jitter."""
    row, col = divmod(obj.cell, 3)
    cell_w = side_px / 3
    return (col + 0.5 + (obj.dx or 0.0)) * cell_w, (row + 0.5 + (obj.dy or 0.0)) * cell_w


def _draw_object(canvas: Image.Image, obj: Obj, side_px: int, seed: int) -> None:
    if obj.cell is None or obj.shape is None:
        raise SceneError(f"cannot render an object without cell and shape: {obj}")
    cx, cy = object_centre(obj, side_px)
    jitter = np.random.default_rng([seed, 7919, obj.cell]).uniform(0.92, 1.08)
    diameter = SIZE_FRACTION[obj.size or "medium"] * side_px * jitter
    radius = diameter / 2
    tile_side = int(math.ceil(diameter + 4 * SUPERSAMPLE))
    rgb = COLOUR_RGB[(obj.hue or "gray", obj.shade or "light")]
    mask = _shape_mask(obj.shape, tile_side, radius)
    pattern = obj.pattern or "solid"
    if pattern == "outlined":
        ring = max(SUPERSAMPLE, int(round(OUTLINE_FRACTION * diameter)))
        mask = ImageChops.subtract(mask, _erode(mask, ring))
    fill = _pattern_fill(pattern, rgb, tile_side, diameter)
    x0, y0 = int(round(cx - tile_side / 2)), int(round(cy - tile_side / 2))
    canvas.paste(fill, (x0, y0), mask)
    if obj.label:
        if pattern == "outlined":  # hollow: the letter sits on the background
            under = canvas.getpixel((int(cx), int(cy)))
        else:
            under = rgb if pattern == "solid" else _tint(rgb)
        ink = (15, 15, 15) if _luma(under) > 140 else (245, 245, 245)  # type: ignore[arg-type]
        draw = ImageDraw.Draw(canvas)
        dy = 0.12 * radius if obj.shape == "triangle" else 0.0  # the triangle's mass sits low
        draw.text((cx, cy + dy), obj.label, fill=ink, font=_font(int(LABEL_FRACTION * diameter)), anchor="mm")


def render(scene: Scene, seed: int, size: int = 112) -> Image.Image:
    """The scene as a size x size RGB image; identical pixels for the same scene and seed."""
    side = size * SUPERSAMPLE
    rng = np.random.default_rng([seed, 1])
    canvas = _background(scene, side, side, rng)
    for obj in scene.objects:
        _draw_object(canvas, obj, side, seed)
    return canvas.resize((size, size), Image.Resampling.BOX)


def to_png(image: Image.Image, scene: Scene, seed: int | None = None) -> bytes:
    """PNG bytes of `image` with the scene (and the render seed, when given) in tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text(SCENE_KEY, scene.to_json())
    if seed is not None:
        info.add_text(SEED_KEY, str(int(seed)))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def attach(image: Image.Image, scene: Scene, seed: int | None = None) -> Image.Image:
    """Puts the scene (and seed) into `image.info`, where `read_scene` and `png_text` find them in memory."""
    image.info[SCENE_KEY] = scene.to_json()
    if seed is not None:
        image.info[SEED_KEY] = str(int(seed))
    return image


def _info(image_or_bytes: Image.Image | bytes) -> dict:
    if isinstance(image_or_bytes, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image_or_bytes)) as im:
                return dict(im.info)
        except Exception as e:  # noqa: BLE001 - any decoder error: not an image we can read metadata from
            raise SceneError(f"cannot read image metadata: {type(e).__name__}: {e}") from None
    return dict(image_or_bytes.info)


def read_scene(image_or_bytes: Image.Image | bytes) -> Scene | None:
    """The scene stored in an image (PNG bytes or a PIL image); None when there is none; SceneError when
    the stored scene is malformed."""
    text = _info(image_or_bytes).get(SCENE_KEY)
    if text is None:
        return None
    if not isinstance(text, str):
        raise SceneError(f"{SCENE_KEY} metadata is {type(text).__name__}, not text")
    return Scene.from_json(text)


def read_seed(image_or_bytes: Image.Image | bytes) -> int | None:
    """The render seed stored in an image, or None."""
    text = _info(image_or_bytes).get(SEED_KEY)
    try:
        return None if text is None else int(text)
    except ValueError:
        raise SceneError(f"{SEED_KEY} metadata {text!r} is not an integer") from None


def render_png(scene: Scene, seed: int, size: int = 112) -> bytes:
    """`to_png(render(scene, seed, size), scene, seed)`."""
    return to_png(render(scene, seed, size), scene, seed)
