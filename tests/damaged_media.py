"""Damaged benchmark TSVs and images for tests/test_damaged_inputs.py. TSVs go through `viper eval`'s reader
(a bad row is skipped, reported with its index and reason, and counted in the results); images through
`viper-synth caption-refine`'s input check (`load_image`: a rejected image is counted by reason in the job
manifest), which decides what a record holds."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from damaged_inputs_cases import Outcome, Shared, bomb_png, call, case, cli, png, tsv, tsv_row

# ------------------------------------------------------------------------------------------ eval TSVs


def read_eval_tsv(path: Path) -> Outcome:
    from viper_jax.evaluation.tsv import read_tsv

    outcome = call(lambda: read_tsv(path))
    if outcome[0] != "used":
        return outcome
    data = read_tsv(path)
    if not data.skipped:
        return "used", f"{len(data.rows)} row(s), none skipped"
    shown = " | ".join(f"row {s.index} [{s.reason}]: {s.message}" for s in data.skipped)
    return "skip", f"{len(data.rows)} row(s) kept, {len(data.skipped)} skipped and counted: {shown}"


def _tsv_case(damage: str, rows: list[dict[str, str]], names: list[str], expect: str = "skip") -> None:
    def run(shared: Shared, tmp: Path) -> tuple[Outcome, list[str]]:
        path = tmp / "bench.tsv"
        path.write_text(tsv([tsv_row("0"), *rows]))
        return read_eval_tsv(path), names
    case("eval TSV", damage, expect)(run)


_tsv_case("image cell not base64", [{**tsv_row("7"), "image": "not*base64" * 20}], ["row 7"])
_tsv_case("image cell base64 of text", [tsv_row("7", image=b"hello, not an image" * 10)], ["row 7"])
_tsv_case("image a truncated PNG", [tsv_row("7", image=png()[:300])], ["row 7"])
_tsv_case("image a decompression bomb", [tsv_row("7", image=bomb_png())], ["row 7"])
_tsv_case("image 16-bit greyscale", [tsv_row("7", image=png((32, 32), "I;16", 40000))], ["row 7"])
_tsv_case("answer not among the options", [tsv_row("7", answer="D")], ["row 7"])
_tsv_case("empty answer", [tsv_row("7", answer="")], ["row 7"])
_tsv_case("index appears twice", [tsv_row("0")], ["row 0"])
_tsv_case("image_path to a missing file", [{**tsv_row("7"), "image": "", "image_path": "gone.png"}],
          ["row 7", "gone.png"])


@case("eval TSV", "a row with too few fields", "skip")
def _(shared: Shared, tmp: Path):
    path = tmp / "bench.tsv"
    path.write_text(tsv([tsv_row("0")]) + "7\tWhat?\n")
    return read_eval_tsv(path), ["row 7"]


@case("eval TSV", "zero bytes")
def _(shared: Shared, tmp: Path):
    (tmp / "bench.tsv").write_text("")
    return read_eval_tsv(tmp / "bench.tsv"), [str(tmp / "bench.tsv")]


@case("eval TSV", "column answer missing")
def _(shared: Shared, tmp: Path):
    rows = [{k: v for k, v in tsv_row("0").items() if k != "answer"}]
    (tmp / "bench.tsv").write_text(tsv(rows))
    return read_eval_tsv(tmp / "bench.tsv"), [str(tmp / "bench.tsv"), "answer"]


@case("eval TSV", "not UTF-8 (Latin-1 bytes)")
def _(shared: Shared, tmp: Path):
    (tmp / "bench.tsv").write_bytes(tsv([tsv_row("0", question="Qu'est-ce que c'est ?")]).encode()
                                    .replace(b"?", "\u00e9?".encode("latin-1")))
    return read_eval_tsv(tmp / "bench.tsv"), [str(tmp / "bench.tsv")]


@case("eval TSV", "missing file (viper eval --tsv)")
def _(shared: Shared, tmp: Path):
    from viper_jax.cli import main

    argv = ["eval", "--model", str(shared.model), "--tsv", str(tmp / "gone.tsv")]
    return cli("viper", main, argv), [str(tmp / "gone.tsv")]


# ------------------------------------------------------------------------------------------ images

def load_input_image(path: Path) -> tuple[Outcome, Any]:
    """viper-synth's input check with its default limits: ('skip', reason: detail) or ('used', mode size)."""
    from synthesis_torch.config import default_config
    from synthesis_torch.inputs import BadImage, load_image

    c = default_config().inputs
    try:
        data, image = load_image(path, min_side=c.min_side, max_pixels=c.max_pixels, max_aspect=c.max_aspect,
                                 max_bytes=c.max_bytes)
    except BadImage as e:
        return ("skip", f"rejected and counted as {e.reason}: {e.detail}"), None
    except Exception as e:  # noqa: BLE001 - anything else reaches the job as a traceback
        return ("traceback", f"{type(e).__name__}: {e}"), None
    return ("used", f"used: {image.mode} {image.size[0]}x{image.size[1]}"), image


def _image_case(damage: str, data: bytes, expect: str = "skip", suffix: str = "png",
                pixel: tuple[int, int, int] | None = None, note: str = "") -> None:
    """pixel: for an image that must be used, the RGB the top-left pixel must read as (what the trainer's
    image processor sees for the same bytes)."""
    def run(shared: Shared, tmp: Path) -> tuple[Outcome, list[str]]:
        path = tmp / f"photo.{suffix}"
        path.write_bytes(data)
        (verdict, message), image = load_input_image(path)
        if image is not None and pixel is not None:
            got = image.convert("RGB").getpixel((0, 0))
            if max(abs(a - b) for a, b in zip(got, pixel)) > 8:
                return ("wrong", f"{message}; top-left pixel {got}, the trainer sees {pixel}"), []
            message += f", top-left pixel {got}{note}"
        return (verdict, message), []
    case("image", damage, expect)(run)


def _palette_with_alpha() -> bytes:
    img = Image.new("P", (160, 160), 0)
    img.putpalette([200, 30, 30, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 80, 160))
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=1)  # palette entry 1 (blue) fully transparent
    return buf.getvalue()


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (200, 160), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (160, 160), c) for c in ((200, 30, 30), (30, 30, 200))]
    buf = io.BytesIO()
    extra = {} if fmt == "MPO" else {"duration": 100, "loop": 0}
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], **extra)
    return buf.getvalue()


_image_case("CMYK JPEG", png(mode="CMYK", colour=(0, 215, 215, 55), format="JPEG"), "used", "jpg",
            pixel=(200, 31, 31), note=" (PIL's CMYK conversion, as the trainer's)")
_image_case("16-bit greyscale PNG", png(mode="I;16", colour=40000))
_image_case("palette PNG with a transparent colour", _palette_with_alpha(), "used", pixel=(255, 255, 255),
            note=" (transparent: white, as the trainer's image processor composites it)")
_image_case("EXIF orientation 6 (rotated) JPEG", _exif_rotated(), "used", "jpg", pixel=(200, 30, 30),
            note=" (stored orientation kept: the trainer decodes the same bytes the same way)")
_image_case("MPO JPEG (a phone photo with a second, preview frame)", _animated("MPO"), "used", "jpg",
            pixel=(200, 30, 30), note=" (the photo, frame 0: MPO's extra frames are not an animation)")
_image_case("animated GIF", _animated("GIF"), suffix="gif")
_image_case("animated PNG (APNG)", _animated("PNG"))
_image_case("decompression bomb (30000x30000 header)", bomb_png())
_image_case("zero bytes", b"")
_image_case("PNG cut to 300 bytes", png()[:300])
_image_case("JPEG bytes named .png", png(format="JPEG"), "used", pixel=(200, 30, 30),
            note=" (the format is read from the bytes, kept verbatim in the record)")
