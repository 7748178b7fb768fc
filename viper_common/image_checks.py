"""What every reader of an image (synthesis inputs, training records, eval TSVs) refuses or converts the same way,
so that the image a VLM captions in synthesis is the image the trainer and the evaluator see.

PIL opens some files in forms the RGB pipeline reads wrongly without an error: a 16-bit greyscale PNG (mode
I;16) converts to RGB by clipping every value above 255 (a mostly white picture), and an animated PNG or GIF
shows only its first frame. Those are refused. Transparency is composited onto white, as transformers'
image processors do (`convert_to_rgb`); PIL's own `convert("RGB")` drops the alpha instead, which would
show the synthesis VLM the colours hidden under transparent pixels."""

from __future__ import annotations

from typing import Any

# Modes holding more than 8 bits per channel: PIL's conversion to RGB clips them.
HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})


class UnusableImage(ValueError):
    """An image that decodes but that the RGB pipeline would read wrongly; `reason` is a skip counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_usable(image: Any) -> None:
    """Raises UnusableImage for an opened PIL image that would be read wrongly (see the module doc)."""
    if image.mode in HIGH_DEPTH_MODES:
        raise UnusableImage("unsupported_mode", f"{image.mode} image ({_depth(image.mode)} per pixel): the RGB "
                                                f"conversion would clip it; convert it to 8-bit first")
    frames = getattr(image, "n_frames", 1)
    # A phone's MPO JPEG holds extra pictures (previews, depth) after the photo: its first frame is the photo.
    if frames > 1 and image.format != "MPO":
        raise UnusableImage("animated", f"animated {image.format} of {frames} frames: only the first would be "
                                        f"seen; give one frame as a still image")


def to_rgb(image: Any) -> Any:
    """The RGB image transformers' image processors make of `image` (transparency composited onto white)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _depth(mode: str) -> str:
    return "32-bit" if mode in ("I", "F") else "16-bit"
