"""The difference band that rejects edits which changed nothing or changed everything (stage 2).

Measures. Both images are converted to RGB and resized to `size` x `size` (box filter: an area average,
which smooths resampling noise and small re-generation drift, and makes images of different resolution
or aspect ratio comparable), scaled to [0, 1]; d = |a - b| per pixel and channel.
- mean_abs: mean of d.
- changed_fraction: share of pixels whose channel-mean d exceeds `pixel_threshold` (default 0.1).

Band: an edit is kept if min <= metric <= max, with metric `changed_fraction` by default. mean_abs is
area-weighted, so a small-object edit hardly moves it (small objects are exactly what stage 2 targets),
while changed_fraction counts the changed area whatever the rest of the image does. Measured here on
synthetic 480x320 gradient-and-shapes images (see tests/test_synthesis.py), changed_fraction / mean_abs:
    identical                       0      / 0
    JPEG re-encode, quality 90      0      / 0.0024      (quality 75: 0 / 0.0038)
    resize 480x320 -> 400x300       0      / 0.0015
    recolour a patch of 1 % area    0.011  / 0.0038
    recolour a patch of 5 % area    0.051  / 0.017
    another synthetic image         0.56   / 0.17
    independent uniform noise       0.91   / 0.23
    the image's negative            0.999  / 0.44
Defaults: min 0.002 (about a 1 % object, halved; re-encoding and mild drift stay at 0) and max 0.7 (more
than 70 % of the image changed: a new picture, not an edit). They are not calibrated on real
Qwen-Image-Edit outputs (no GPU run of the real editor was possible where this was written): every record
stores both measures (provenance "changed_fraction", "mean_abs", and per operation in "ops"), and
`viper-synth summary` prints their quantiles, so a run can be calibrated from a first small batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

METRICS = ("changed_fraction", "mean_abs")


@dataclasses.dataclass(frozen=True)
class Difference:
    mean_abs: float
    changed_fraction: float

    def as_dict(self) -> dict[str, float]:
        return {"mean_abs": round(self.mean_abs, 6), "changed_fraction": round(self.changed_fraction, 6)}


def _pixels(image: Image.Image, size: int) -> np.ndarray:
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.float32) / 255.0


def image_difference(a: Image.Image, b: Image.Image, size: int = 256, pixel_threshold: float = 0.1) -> Difference:
    diff = np.abs(_pixels(a, size) - _pixels(b, size))
    return Difference(float(diff.mean()), float((diff.mean(axis=-1) > pixel_threshold).mean()))


def band_verdict(d: Difference, metric: str, low: float, high: float) -> str | None:
    """None if the edit is inside the band, else the reject reason ("no_change" / "too_large")."""
    if metric not in METRICS:
        raise ValueError(f"diff metric must be one of {METRICS}, got {metric!r}")
    value = getattr(d, metric)
    if value < low:
        return "no_change"
    if value > high:
        return "too_large"
    return None
