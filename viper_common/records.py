"""The ViPER training record: one definition, written by `synthesis_torch`, read by `viper_jax`.

Wire format of one record (one ArrayRecord entry), version 1:

    b"VIPR" | u32 header_len (little endian) | header JSON (utf-8) | image bytes...

The header holds every field except the image payloads, plus `image_sizes` (byte length of each
image, in order). Images are stored as their encoded bytes (PNG, JPEG or WebP), never re-encoded.
No pickle anywhere: a record is readable with nothing but `json`.

Shards are written atomically (to a temporary name, then renamed), and a shard set has a
`manifest.json` with per-shard counts, so a reader never sees a half-written shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from viper_common.atomic_files import write_failed, write_json_atomic

SCHEMA_VERSION = 1
MAGIC = b"VIPR"
TASKS = ("caption_refine", "visual_ops")  # ViPER's two tasks (what synthesis writes, what GRPO trains on)
IMAGES_PER_TASK = {"caption_refine": 1, "visual_ops": 2}
# Plain supervised data (`viper sft`): 1 or 2 images, the user text in `prompt`, the response in `answer`.
INSTRUCT = "instruct"
ALL_TASKS = TASKS + (INSTRUCT,)
IMAGE_COUNTS = {**{t: (n,) for t, n in IMAGES_PER_TASK.items()}, INSTRUCT: (1, 2)}
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".arrayrecord"

_IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
)


class RecordError(ValueError):
    """A record that cannot be used. `reason` is a short stable key used for skip counters."""

    def __init__(self, reason: str, message: str, record_id: str | None = None):
        self.reason = reason
        self.record_id = record_id
        where = f"record {record_id!r}: " if record_id else ""
        super().__init__(f"{where}{message} [{reason}]")


@dataclasses.dataclass(frozen=True)
class ViperRecord:
    """One training sample.

    id: stable, unique within a data set (synthesis derives it from the source image).
    task: "caption_refine" (images = [original], caption = the caption under refinement, truth = the
      corrections) or "visual_ops" (images = [original, edited], truth = the edit operations).
    truth: ground-truth sentences, one correction / operation each.
    provenance: where it came from: {"source": path, "models": {...}, "seeds": {...}, ...}.
    prompt, answer: task "instruct" only (required there, absent elsewhere): the user text without
      vision tokens (the images come first in the user turn) and the full assistant response; its
      truth may be empty.
    answer_focus: task "instruct" only, optional: sorted, disjoint [start, end) character spans of `answer`
      whose words state what the images show (a colour, a count, "yes"); `viper sft` can weight them
      (sft.focus_steps / sft.focus_weight). Empty: no span is marked.
    """

    id: str
    task: str
    images: tuple[bytes, ...]
    truth: tuple[str, ...]
    caption: str | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    prompt: str | None = None
    answer: str | None = None
    answer_focus: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "truth", tuple(self.truth))
        object.__setattr__(self, "answer_focus", tuple(tuple(span) for span in self.answer_focus))
        validate(self)


def image_format(data: bytes) -> str | None:
    """'png', 'jpeg', 'webp' or None, from the magic bytes."""
    for signature, name in _IMAGE_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def validate(record: ViperRecord) -> None:
    """Raises RecordError if the record breaks the contract."""
    rid = record.id
    if not isinstance(rid, str) or not rid:
        raise RecordError("missing_field", "empty or non-string id", None)
    if record.schema_version != SCHEMA_VERSION:
        raise RecordError("schema_version",
                          f"schema_version {record.schema_version}, this code reads {SCHEMA_VERSION}", rid)
    if record.task not in ALL_TASKS:
        raise RecordError("bad_field", f"task {record.task!r} is not one of {ALL_TASKS}", rid)
    want = IMAGE_COUNTS[record.task]
    if len(record.images) not in want:
        raise RecordError("bad_field", f"task {record.task} needs {' or '.join(map(str, want))} image(s), "
                                       f"got {len(record.images)}", rid)
    for i, img in enumerate(record.images):
        if not isinstance(img, (bytes, bytearray)) or image_format(bytes(img)) is None:
            raise RecordError("bad_image", f"image {i} is not PNG/JPEG/WebP bytes", rid)
    if record.caption is not None and not isinstance(record.caption, str):
        raise RecordError("bad_field", f"caption must be a string, got {type(record.caption).__name__}", rid)
    if record.task == "caption_refine" and not record.caption:
        raise RecordError("missing_field", "caption_refine record without a caption", rid)
    if not isinstance(record.provenance, dict):
        raise RecordError("bad_field", "provenance must be a JSON object", rid)
    for name in ("prompt", "answer"):
        value = getattr(record, name)
        if record.task != INSTRUCT:
            if value is not None:
                raise RecordError("bad_field", f"field {name!r} belongs to task {INSTRUCT!r} only, not {record.task!r}",
                                  rid)
        elif value is None or (isinstance(value, str) and not value.strip()):
            raise RecordError("missing_field", f"task {INSTRUCT} needs a non-empty {name!r}", rid)
        elif not isinstance(value, str):
            raise RecordError("bad_field", f"{name} must be a string, got {type(value).__name__}", rid)
    _validate_focus(record)
    if not all(isinstance(s, str) and s.strip() for s in record.truth):
        raise RecordError("missing_field", "truth sentences must be non-empty strings", rid)
    if not record.truth and record.task != INSTRUCT:
        raise RecordError("missing_field", "truth must be a non-empty list of non-empty sentences", rid)


def _validate_focus(record: ViperRecord) -> None:
    spans = record.answer_focus
    if not spans:
        return
    if record.task != INSTRUCT:
        raise RecordError("bad_field", f"field 'answer_focus' belongs to task {INSTRUCT!r} only, not {record.task!r}",
                          record.id)
    end = 0
    for span in spans:
        ok = (len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
              and end <= span[0] < span[1] <= len(record.answer))
        if not ok:
            raise RecordError("bad_field", f"answer_focus spans must be sorted, disjoint [start, end) int pairs "
                                           f"inside the {len(record.answer)}-character answer, got {list(spans)}",
                              record.id)
        end = span[1]


def encode(record: ViperRecord) -> bytes:
    header = {
        "schema_version": record.schema_version,
        "id": record.id,
        "task": record.task,
        "caption": record.caption,
        "truth": list(record.truth),
        "provenance": record.provenance,
        "image_sizes": [len(b) for b in record.images],
    }
    # Written only when set, so a ViPER record encodes to the same bytes as before instruct existed.
    header.update({k: v for k, v in (("prompt", record.prompt), ("answer", record.answer)) if v is not None})
    if record.answer_focus:
        header["answer_focus"] = [list(span) for span in record.answer_focus]
    head = json.dumps(header, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *record.images])


_REQUIRED = ("schema_version", "id", "task", "truth", "image_sizes")


def decode(data: bytes) -> ViperRecord:
    """Parses and validates one record; every failure is a RecordError with a reason key."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise RecordError("bad_magic", "not a ViPER record (bad magic bytes)")
    (head_len,) = struct.unpack("<I", data[4:8])
    if 8 + head_len > len(data):
        raise RecordError("truncated", f"header needs {head_len} bytes, {len(data) - 8} present")
    try:
        header = json.loads(data[8:8 + head_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError("bad_header", f"header is not valid JSON: {e}") from None
    rid = header.get("id") if isinstance(header, dict) else None
    if not isinstance(header, dict):
        raise RecordError("bad_header", "header is not a JSON object")
    for key in _REQUIRED:
        if key not in header:
            raise RecordError("missing_field", f"missing field {key!r}", rid)
    if header["schema_version"] != SCHEMA_VERSION:
        raise RecordError("schema_version",
                          f"schema_version {header['schema_version']}, this code reads {SCHEMA_VERSION}", rid)
    sizes = header["image_sizes"]
    # Checked before use: a non-list or negative size would otherwise crash `sum` or mis-slice the body.
    if not isinstance(sizes, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in sizes):
        raise RecordError("bad_header", f"image_sizes must be a list of non-negative ints, got {sizes!r}", rid)
    # tuple("a string") would silently become a tuple of characters, so the container types are checked.
    if not isinstance(header["truth"], list):
        raise RecordError("bad_field", f"truth must be a list, got {type(header['truth']).__name__}", rid)
    focus = header.get("answer_focus", [])
    if not isinstance(focus, list) or not all(isinstance(span, list) for span in focus):
        raise RecordError("bad_field", f"answer_focus must be a list of [start, end] pairs, got {focus!r}", rid)
    body = data[8 + head_len:]
    if sum(sizes) != len(body):
        raise RecordError("truncated", f"images need {sum(sizes)} bytes, {len(body)} present", rid)
    images, offset = [], 0
    for size in sizes:
        images.append(bytes(body[offset:offset + size]))
        offset += size
    try:
        return ViperRecord(id=rid, task=header["task"], images=tuple(images), truth=tuple(header["truth"]),
                           caption=header.get("caption"), provenance=header.get("provenance") or {},
                           schema_version=header["schema_version"], prompt=header.get("prompt"),
                           answer=header.get("answer"), answer_focus=tuple(map(tuple, focus)))
    except TypeError as e:
        raise RecordError("bad_field", str(e), rid) from None


class ShardWriter:
    """Writes one ArrayRecord shard atomically: records go to `<path>.tmp`, renamed on close().

    Used as a context manager; an exception inside the block deletes the temporary file, so a shard
    path either holds a complete shard or does not exist.
    """

    def __init__(self, path: str | os.PathLike):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        # group_size:1 keeps random access cheap (Grain reads single records).
        self._writer = ArrayRecordWriter(str(self._tmp), "group_size:1")
        self.count = 0
        self.ids: list[str] = []

    def write(self, record: ViperRecord) -> None:
        validate(record)
        self._writer.write(encode(record))
        self.count += 1
        self.ids.append(record.id)

    def close(self) -> None:
        try:
            self._writer.close()  # flushes the last records: where a full disk shows up
        except OSError as e:
            self._tmp.unlink(missing_ok=True)
            raise write_failed(e, self.path) from e
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        except (OSError, RuntimeError):  # a full disk again: the temporary file goes all the same
            pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
            if isinstance(exc, OSError):  # e.g. ENOSPC: name the shard, not the errno and a temporary name
                raise write_failed(exc, self.path) from exc


def read_shard(path: str | os.PathLike) -> Iterator[bytes]:
    """Raw entries of one shard, in order (for tools and tests; training reads through Grain)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        for i in range(reader.num_records()):
            yield reader.read([i])[0]
    finally:
        reader.close()


def write_shard(path: str | os.PathLike, records: Iterable[ViperRecord]) -> int:
    with ShardWriter(path) as writer:
        for record in records:
            writer.write(record)
    return writer.count


def first_records(directory: str | os.PathLike, task: str, limit: int) -> list[ViperRecord]:
    """The first `limit` records of `task` under a synthesis output folder (its `<task>-*/part-*` shards,
    in name order)."""
    out: list[ViperRecord] = []
    for shard in sorted(Path(directory).glob(f"{task}-*/part-*{SHARD_SUFFIX}")):
        for raw in read_shard(shard):
            out.append(decode(raw))
            if len(out) >= limit:
                return out
    return out


def write_manifest(directory: str | os.PathLike, shards: dict[str, int], **extra: Any) -> Path:
    """Writes `manifest.json` for a shard set atomically. `shards` maps shard file name -> record count."""
    directory = Path(directory)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_records": int(sum(shards.values())),
        "shards": dict(sorted(shards.items())),
        **extra,
    }
    return write_json_atomic(directory / MANIFEST_NAME, manifest, indent=2, sort_keys=True)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')}, "
                         f"this code reads {SCHEMA_VERSION}")
    return manifest
