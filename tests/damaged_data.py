"""Damaged data files for tests/test_damaged_inputs.py: ArrayRecord shards and the records in them (read by
the trainer's Grain pipeline, which counts a bad record's skip by reason), synthesis manifests (read by
`viper-synth summary`) and metrics.jsonl (read on resume and by the loop's report)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

from damaged_inputs_cases import Outcome, Shared, call, case, cli, png, warnings_of
from viper_common import records

# ------------------------------------------------------------------------------------------ records, shards

_TOKENIZER: list[Any] = []


def _pipeline(glob: str) -> Any:
    """The trainer's input pipeline over `glob`, one epoch in order, tiny images and a roomy length bucket."""
    from viper_common.tiny_tokenizer import build_tiny_tokenizer
    from viper_jax.data.config import get_data_config
    from viper_jax.data.pipeline import make_pipeline
    from viper_jax.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS

    if not _TOKENIZER:
        _TOKENIZER.append(build_tiny_tokenizer())
    c = get_data_config()
    c.shard_globs, c.shuffle, c.num_epochs, c.batch_size, c.read_threads = (glob,), False, 1, 1, 1
    c.min_pixels, c.max_pixels, c.length_buckets = TINY_MIN_PIXELS, TINY_MAX_PIXELS, (2048,)
    return make_pipeline(c, _TOKENIZER[0], process_index=0, process_count=1)


def read_through_pipeline(glob: str) -> Outcome:
    """What training gets from the shards: the counted skips with the warning naming each, or the error."""
    seen: dict[str, Any] = {}

    def run() -> None:
        pipeline = _pipeline(glob)
        seen["batches"], seen["stats"] = sum(1 for _ in pipeline), pipeline.stats.as_dict()

    with warnings_of("viper_jax.data") as warned:
        outcome = call(run)
    if outcome[0] != "used":
        return outcome
    stats = seen["stats"]
    if not stats["skipped"]:
        return "used", f"{seen['batches']} batch(es), nothing skipped"
    return "skip", f"counted {stats['skipped']} of {stats['seen']} seen; {' | '.join(warned)}"


def _good_entries(shared: Shared) -> list[bytes]:
    return list(records.read_shard(shared.records / "caption_refine-00000-of-00001" / "part-00000.arrayrecord"))


def _shard_with(shared: Shared, tmp: Path, bad: bytes) -> Path:
    """A shard of one good record then `bad` (written raw: ShardWriter would refuse it)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp / "data" / "part-00000.arrayrecord"
    path.parent.mkdir(parents=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for entry in (_good_entries(shared)[0], bad):
        writer.write(entry)
    writer.close()
    return path


def _header(entry: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<I", entry[4:8])
    return json.loads(entry[8:8 + n]), entry[8 + n:]


def _entry(header: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(header).encode()
    return records.MAGIC + struct.pack("<I", len(head)) + head + body


def _bad_record(damage: Callable[[dict[str, Any], bytes], bytes]) -> Callable:
    def run(shared: Shared, tmp: Path) -> tuple[Outcome, list[str]]:
        header, body = _header(_good_entries(shared)[1])
        path = _shard_with(shared, tmp, damage(header, body))
        return read_through_pipeline(str(path)), ["counted"]
    return run


def _with_image(image: bytes) -> Callable[[dict[str, Any], bytes], bytes]:
    return lambda h, b: _entry({**h, "image_sizes": [len(image)]}, image)


RECORD_DAMAGES: list[tuple[str, Callable[[dict[str, Any], bytes], bytes]]] = [
    ("bad magic bytes", lambda h, b: b"XXXX" + _entry(h, b)[4:]),
    ("header length past the end", lambda h, b: records.MAGIC + struct.pack("<I", 10**6) + b"{}"),
    ("header not JSON", lambda h, b: records.MAGIC + struct.pack("<I", 5) + b"{'id'" + b),
    ("header JSON a list", lambda h, b: _entry([h], b)),  # type: ignore[list-item]
    ("field truth missing", lambda h, b: _entry({k: v for k, v in h.items() if k != "truth"}, b)),
    ("truth a string, not a list", lambda h, b: _entry({**h, "truth": "red"}, b)),
    ("schema_version 2", lambda h, b: _entry({**h, "schema_version": 2}, b)),
    ("image bytes cut short", lambda h, b: _entry(h, b[: len(b) // 2])),
    ("image_sizes negative", lambda h, b: _entry({**h, "image_sizes": [-1]}, b)),
    ("image a truncated PNG (sizes consistent)", lambda h, b: _entry({**h, "image_sizes": [len(b) // 2]},
                                                                      b[: len(b) // 2])),
    ("image a GIF", _with_image(png((64, 64), format="GIF"))),
    ("two images for caption_refine", lambda h, b: _entry({**h, "image_sizes": [len(b), len(b)]}, b + b)),
    ("image 16-bit greyscale PNG", _with_image(png((64, 64), "I;16", 40000))),
]
for _damage, _fn in RECORD_DAMAGES:
    case("ArrayRecord record", _damage, "skip")(_bad_record(_fn))


def _damaged_shard(damage: Callable[[Path], None]) -> Callable:
    def run(shared: Shared, tmp: Path) -> tuple[Outcome, list[str]]:
        path = tmp / "part-00000.arrayrecord"
        shutil.copy(shared.records / "caption_refine-00000-of-00001" / "part-00000.arrayrecord", path)
        damage(path)
        return read_through_pipeline(str(path)), [str(path)]
    return run


case("ArrayRecord shard", "cut to half its length")(
    _damaged_shard(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])))
case("ArrayRecord shard", "last 100 bytes cut (footer gone)")(
    _damaged_shard(lambda p: p.write_bytes(p.read_bytes()[:-100])))
case("ArrayRecord shard", "zero bytes")(_damaged_shard(lambda p: p.write_bytes(b"")))
case("ArrayRecord shard", "not an ArrayRecord file (a PNG)")(_damaged_shard(lambda p: p.write_bytes(png())))


@case("ArrayRecord shard", "glob matching no file")
def _(shared: Shared, tmp: Path):
    glob = str(tmp / "nothing-*" / "part-*.arrayrecord")
    return read_through_pipeline(glob), [glob]


# ------------------------------------------------------------------------------------------ manifests

def _summary(shared: Shared, tmp: Path, damage: Callable[[Path], None]) -> tuple[Outcome, list[str]]:
    """A synthesis output folder (the tiny records plus the job manifests synthesis writes), damaged, then
    `viper-synth summary` on it."""
    from synthesis_torch.cli import main

    out = Path(shutil.copytree(shared.records, tmp / "synth"))
    for job in sorted(out.iterdir()):
        task = job.name.split("-")[0]
        records.write_manifest(job, {"part-00000.arrayrecord": 2}, task=task, shard_index=0, num_shards=1,
                               complete=True, num_inputs=2, num_processed=2, num_rejects=0, rejects_by_reason={})
    damage(out / "caption_refine-00000-of-00001")
    return cli("viper-synth", main, ["summary", str(out)]), [str(out / "caption_refine-00000-of-00001")]


def _edit_manifest(change: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[Path], None]:
    def damage(job: Path) -> None:
        path = job / records.MANIFEST_NAME
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return damage


MANIFEST_DAMAGES: list[tuple[str, Callable[[Path], None]]] = [
    ("missing (the job folder still holds its shard)", lambda job: (job / records.MANIFEST_NAME).unlink()),
    ("not JSON (cut short)", lambda job: (job / records.MANIFEST_NAME).write_text('{"task": "capt')),
    ("schema_version 9", _edit_manifest(lambda m: {**m, "schema_version": 9})),
    ("key task missing", _edit_manifest(lambda m: {k: v for k, v in m.items() if k != "task"})),
    ("a shard's count wrong (5, the file holds 2)", _edit_manifest(lambda m: {**m, "shards": {
        "part-00000.arrayrecord": 5}, "num_records": 5})),
    ("names a shard that is missing", _edit_manifest(lambda m: {**m, "shards": {
        **m["shards"], "part-00001.arrayrecord": 2}, "num_records": 4})),
]
for _damage, _fn in MANIFEST_DAMAGES:
    case("synthesis manifest.json", _damage)(lambda shared, tmp, fn=_fn: _summary(shared, tmp, fn))


# ------------------------------------------------------------------------------------------ metrics.jsonl

ROWS = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))


@case("metrics.jsonl", "half-written last line (a kill mid-write)", "used")
def _(shared: Shared, tmp: Path):
    from viper_jax.train.metrics import read_metrics

    path = tmp / "metrics.jsonl"
    path.write_text(ROWS + '{"step": 4, "lo')
    with warnings_of("viper_jax.train") as warned:
        rows = read_metrics(path)
    ok = [r["step"] for r in rows] == [1, 2, 3]
    return ("used" if ok else "wrong", f"rows {[r['step'] for r in rows]}; warns: {' | '.join(warned)}"), [str(path)]


@case("metrics.jsonl", "a bad line before the last")
def _(shared: Shared, tmp: Path):
    from viper_jax.train.metrics import read_metrics

    path = tmp / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"st\n' + ROWS)
    return call(lambda: read_metrics(path)), [str(path), "line 2"]
