"""Inputs of a synthesis job: image folders (stage 1) or record shards (stage 2), their stable ids, the
deterministic split across job shards, per-image seeds, and the checks that skip bad images.

- Stable id of an image: the first 16 hex digits of sha1 of its path relative to the input folder (POSIX
  form). It does not depend on the machine, the mount point or the job split, so reruns and other shards
  agree on it. Records are named `csr-<id>` (stage 1) and `vop-<id>` (stage 2, same image).
- Split: input `id` belongs to job shard `int(sha1(id), 16) % num_shards`. A hash rather than a stride,
  so adding or removing images does not move the others between shards.
- Seeds: `derive_seed(base, id, purpose)` hashes all three; the same image gets the same noise in any
  shard, batch or restart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image

from viper_common import records
from viper_common.image_checks import UnusableImage, check_usable, to_rgb

# PIL's format names of the files we keep verbatim (the record contract stores PNG/JPEG/WebP bytes).
_KEPT_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}


@dataclasses.dataclass(frozen=True)
class ImageInput:
    key: str  # stable id (see module docstring)
    path: Path
    rel: str  # path relative to the input folder


@dataclasses.dataclass(frozen=True)
class RecordInput:
    key: str  # the stage-1 image key (so stage 2 ids and seeds follow the image)
    record_id: str
    shard: Path
    index: int  # position in the shard


@dataclasses.dataclass(frozen=True)
class Reject:
    key: str
    source: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


class BadImage(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def stable_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def shard_of(key: str, num_shards: int) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % num_shards


def derive_seed(base: int, key: str, purpose: str) -> int:
    digest = hashlib.sha256(f"{base}:{key}:{purpose}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def select_shard(items: Iterable, shard_index: int, num_shards: int) -> list:
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    return [x for x in items if shard_of(x.key, num_shards) == shard_index]


def list_images(folder: str | Path, extensions: Iterable[str]) -> list[ImageInput]:
    """Image files under `folder` (recursive) with one of `extensions`, sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    exts = {"." + e.lower().lstrip(".") for e in extensions}
    found = []
    for path in root.rglob("*"):
        if path.suffix.lower() in exts and path.is_file():
            rel = path.relative_to(root).as_posix()
            found.append(ImageInput(stable_key(rel), path, rel))
    found.sort(key=lambda x: x.rel)
    keys = [x.key for x in found]
    if len(set(keys)) != len(keys):  # 64-bit hash collision: astronomically unlikely, but never silent
        raise ValueError("two input paths hash to the same id")
    return found


def load_image(path: Path, *, min_side: int, max_pixels: int, max_aspect: float, max_bytes: int
               ) -> tuple[bytes, Image.Image]:
    """The file's bytes (kept verbatim for the record) and the decoded RGB image; BadImage if unusable.

    The size is checked from the header before decoding, so a huge file is rejected without being loaded.
    EXIF orientation is not applied: the trainer decodes the same bytes the same way.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadImage("unreadable", str(e)) from None
    if size > max_bytes:
        raise BadImage("too_large", f"{size} bytes > {max_bytes}")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = _KEPT_FORMATS.get(image.format or "")
            if fmt is None or records.image_format(data) != fmt:
                raise BadImage("unsupported_format", f"format {image.format}")
            w, h = image.size
            if w * h > max_pixels:
                raise BadImage("too_large", f"{w}x{h} > {max_pixels} pixels")
            if min(w, h) < min_side:
                raise BadImage("too_small", f"{w}x{h}, shorter side < {min_side}")
            if max(w, h) / min(w, h) > max_aspect:
                raise BadImage("bad_aspect", f"{w}x{h}, aspect ratio > {max_aspect}")
            check_usable(image)  # 16-bit or animated: the RGB conversion would read it wrongly
            image.load()  # decodes: catches truncated and corrupt files
            return data, to_rgb(image)  # transparency onto white, as the trainer's image processor does
    except UnusableImage as e:
        raise BadImage(e.reason, str(e)) from None
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None


def list_record_shards(paths: Iterable[str | Path]) -> list[Path]:
    """Shard files named by `paths`: files as given, folders searched recursively, sorted."""
    shards: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            shards.extend(sorted(p.rglob("*" + records.SHARD_SUFFIX)))
        elif p.is_file():
            shards.append(p)
        else:
            raise FileNotFoundError(f"no record shard or folder at {p}")
    return sorted(set(shards))


def list_record_inputs(paths: Iterable[str | Path], task: str = "caption_refine") -> list[RecordInput]:
    """An index of the `task` records in the shards (ids and positions; image bytes are not kept)."""
    found: dict[str, RecordInput] = {}
    for shard in list_record_shards(paths):
        for index, raw in enumerate(records.read_shard(shard)):
            rec = records.decode(raw)
            if rec.task != task:
                continue
            key = str(rec.provenance.get("image_key") or stable_key(rec.id))
            found.setdefault(key, RecordInput(key, rec.id, shard, index))  # first copy wins
    return sorted(found.values(), key=lambda r: r.record_id)


def read_records(refs: list[RecordInput]) -> Iterator[tuple[RecordInput, records.ViperRecord]]:
    """The records behind `refs`, opening each shard once (random access by position)."""
    from array_record.python.array_record_module import ArrayRecordReader

    by_shard: dict[Path, list[RecordInput]] = {}
    for ref in refs:
        by_shard.setdefault(ref.shard, []).append(ref)
    for shard, group in by_shard.items():
        reader = ArrayRecordReader(str(shard))
        try:
            for ref in group:
                yield ref, records.decode(reader.read([ref.index])[0])
        finally:
            reader.close()
