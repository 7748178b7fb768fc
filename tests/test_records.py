"""The record contract (viper_common.records): round trip, atomic shards, manifest, every decode failure."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from viper_common import records as R


def _image(fmt: str, size=(24, 16), seed=0) -> bytes:
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _csr(rid="img-0001", **kw) -> R.ViperRecord:
    fields = dict(id=rid, task="caption_refine", images=[_image("PNG")], truth=["The cup is blue.", "A dog is on the left."],
                  caption="A red cup on a table — «café».", provenance={"source": "a/b.jpg", "seeds": {"t2i": 3}})
    fields.update(kw)
    return R.ViperRecord(**fields)


def _vop(rid="img-0002") -> R.ViperRecord:
    return R.ViperRecord(id=rid, task="visual_ops", images=[_image("JPEG", seed=1), _image("WEBP", seed=2)],
                         truth=["remove the lamp"])


def _raw(header: dict, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return R.MAGIC + struct.pack("<I", len(head)) + head + body


def _good_header(rec: R.ViperRecord) -> dict:
    data = R.encode(rec)
    (n,) = struct.unpack("<I", data[4:8])
    return json.loads(data[8:8 + n])


# ---------------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("make", [_csr, _vop])
def test_round_trip_is_identity(make):
    rec = make()
    back = R.decode(R.encode(rec))
    assert back == rec
    assert back.images == rec.images  # bytes preserved exactly, never re-encoded


def test_image_format_detects_all_three():
    assert [R.image_format(_image(f)) for f in ("PNG", "JPEG", "WEBP")] == ["png", "jpeg", "webp"]
    assert R.image_format(b"GIF89a....") is None


# ------------------------------------------------------------------------------------ every failure reason

def _reason(data: bytes) -> str:
    with pytest.raises(R.RecordError) as info:
        R.decode(data)
    return info.value.reason


def test_bad_magic():
    assert _reason(b"") == "bad_magic"
    assert _reason(b"VIP") == "bad_magic"
    assert _reason(b"XXXX" + R.encode(_csr())[4:]) == "bad_magic"


def test_truncated_header_and_body():
    data = R.encode(_csr())
    (n,) = struct.unpack("<I", data[4:8])
    assert _reason(data[:8 + n - 1]) == "truncated"  # header cut
    with pytest.raises(R.RecordError) as info:
        R.decode(data[:-1])  # last image byte cut
    assert info.value.reason == "truncated" and info.value.record_id == "img-0001"
    assert _reason(data + b"x") == "truncated"  # trailing garbage is a size mismatch too


def test_bad_header():
    head = b"{not json"
    assert _reason(R.MAGIC + struct.pack("<I", len(head)) + head) == "bad_header"
    head = b"\xff\xfe"
    assert _reason(R.MAGIC + struct.pack("<I", len(head)) + head) == "bad_header"
    assert _reason(_raw([1, 2])) == "bad_header"  # JSON but not an object
    h = _good_header(_csr())
    for sizes in ("12", [1.5], [-1, 2], [True]):
        assert _reason(_raw(dict(h, image_sizes=sizes))) == "bad_header", sizes


@pytest.mark.parametrize("key", ["schema_version", "id", "task", "truth", "image_sizes"])
def test_missing_required_field(key):
    rec = _csr()
    h = _good_header(rec)
    del h[key]
    with pytest.raises(R.RecordError) as info:
        R.decode(_raw(h, rec.images[0]))
    assert info.value.reason == "missing_field"
    assert info.value.record_id == (None if key == "id" else "img-0001")


def test_missing_field_values():
    rec = _csr()
    h = _good_header(rec)
    for bad in (dict(caption=None), dict(caption=""), dict(truth=[]), dict(truth=["ok", "  "]), dict(id="")):
        assert _reason(_raw(dict(h, **bad), rec.images[0])) == "missing_field", bad


def test_schema_version():
    rec = _csr()
    with pytest.raises(R.RecordError) as info:
        R.decode(_raw(dict(_good_header(rec), schema_version=2), rec.images[0]))
    assert info.value.reason == "schema_version" and "img-0001" in str(info.value)


def test_bad_field():
    rec = _csr()
    h = _good_header(rec)
    img = rec.images[0]
    assert _reason(_raw(dict(h, task="detect"), img)) == "bad_field"
    assert _reason(_raw(dict(h, task="visual_ops"), img)) == "bad_field"  # visual_ops needs two images
    assert _reason(_raw(dict(h, truth="a string, not a list"), img)) == "bad_field"
    assert _reason(_raw(dict(h, caption=5), img)) == "bad_field"
    assert _reason(_raw(dict(h, provenance=[1]), img)) == "bad_field"


def test_bad_image():
    rec = _csr()
    junk = b"definitely not an image"
    assert _reason(_raw(dict(_good_header(rec), image_sizes=[len(junk)]), junk)) == "bad_image"


def test_constructor_validates():
    with pytest.raises(R.RecordError, match="missing_field"):
        _csr(caption=None)
    with pytest.raises(R.RecordError, match="bad_image"):
        _csr(images=[b"nope"])


# ------------------------------------------------------------------------------------------ shards, manifest

def test_shard_round_trip_and_no_temp_left(tmp_path):
    recs = [_csr(f"r{i}") for i in range(3)] + [_vop("v0")]
    path = tmp_path / "s" / "shard-00000.arrayrecord"
    assert R.write_shard(path, recs) == 4
    assert [R.decode(b) for b in R.read_shard(path)] == recs
    assert sorted(p.name for p in path.parent.iterdir()) == ["shard-00000.arrayrecord"]


def test_exception_inside_writer_leaves_no_shard(tmp_path):
    path = tmp_path / "shard-00001.arrayrecord"
    with pytest.raises(RuntimeError, match="boom"):
        with R.ShardWriter(path) as w:
            w.write(_csr("a"))
            w.write(_csr("b"))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temporary file


def test_invalid_record_inside_writer_leaves_no_shard(tmp_path):
    path = tmp_path / "shard.arrayrecord"
    good = _csr("a")
    bad = object.__new__(R.ViperRecord)  # bypasses __post_init__ to reach write()'s own validation
    for f in R.dataclasses.fields(R.ViperRecord):
        object.__setattr__(bad, f.name, getattr(good, f.name))
    object.__setattr__(bad, "truth", ())
    with pytest.raises(R.RecordError):
        R.write_shard(path, [good, bad])
    assert list(tmp_path.iterdir()) == []


def test_shard_not_visible_before_close(tmp_path):
    path = tmp_path / "shard.arrayrecord"
    w = R.ShardWriter(path)
    w.write(_csr())
    assert not path.exists()
    w.close()
    assert path.exists() and w.count == 1 and w.ids == ["img-0001"]


def test_manifest(tmp_path):
    path = R.write_manifest(tmp_path, {"b.arrayrecord": 2, "a.arrayrecord": 3}, task="caption_refine")
    assert path.name == R.MANIFEST_NAME and not list(tmp_path.glob("*.tmp*"))
    m = R.read_manifest(tmp_path)
    assert m["num_records"] == 5 and list(m["shards"]) == ["a.arrayrecord", "b.arrayrecord"]
    assert m["task"] == "caption_refine" and m["schema_version"] == R.SCHEMA_VERSION


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        R.read_manifest(tmp_path)
    (tmp_path / R.MANIFEST_NAME).write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        R.read_manifest(tmp_path)
    (tmp_path / R.MANIFEST_NAME).write_text(json.dumps({"schema_version": 99, "shards": {}}))
    with pytest.raises(ValueError, match="schema_version 99"):
        R.read_manifest(tmp_path)


# ------------------------------------------------------------------------------ task "instruct" (viper sft)

def _instruct(rid="ins-0001", images=1, **kw) -> R.ViperRecord:
    fields = dict(id=rid, task=R.INSTRUCT, images=[_image("PNG", seed=s) for s in range(images)], truth=[],
                  prompt="How many circles are there?", answer="<think>I count them.</think><answer>3</answer>")
    fields.update(kw)
    return R.ViperRecord(**fields)


@pytest.mark.parametrize("images", [1, 2])
def test_instruct_round_trip(images):
    rec = _instruct(images=images, truth=["There are three circles."])
    back = R.decode(R.encode(rec))
    assert back == rec and back.prompt == rec.prompt and back.answer == rec.answer
    assert _good_header(rec)["prompt"] == "How many circles are there?"
    assert R.decode(R.encode(_instruct(truth=[]))).truth == ()  # truth may be empty for instruct


@pytest.mark.parametrize("field", ["prompt", "answer"])
def test_instruct_missing_field_is_named(field):
    rec = _instruct()
    h = _good_header(rec)
    del h[field]
    with pytest.raises(R.RecordError) as info:
        R.decode(_raw(h, rec.images[0]))
    assert info.value.reason == "missing_field" and repr(field) in str(info.value) and "ins-0001" in str(info.value)
    with pytest.raises(R.RecordError, match=f"'{field}'"):
        _instruct(**{field: "  "})
    assert _reason(_raw(dict(h, **{field: 7}), rec.images[0])) == "bad_field"


def test_instruct_image_count_and_field_ownership():
    assert _reason(_raw(_good_header(_instruct()), b"")) == "truncated"
    h = dict(_good_header(_instruct()), image_sizes=[])
    assert _reason(_raw(h)) == "bad_field"  # 0 images
    with pytest.raises(R.RecordError, match="1 or 2 image"):
        _instruct(images=3)
    # prompt/answer on a ViPER task: refused, naming the field (not silently ignored)
    with pytest.raises(R.RecordError, match="'answer' belongs to task 'instruct'") as info:
        _csr(answer="x")
    assert info.value.reason == "bad_field"


def test_old_records_unchanged():
    # A ViPER record's header holds no prompt/answer keys, so its bytes are what version-1 code wrote.
    for rec in (_csr(), _vop()):
        h = _good_header(rec)
        assert sorted(h) == ["caption", "id", "image_sizes", "provenance", "schema_version", "task", "truth"]
        back = R.decode(R.encode(rec))
        assert back == rec and back.prompt is None and back.answer is None and back.schema_version == 1
    # A header written before the new fields existed (built by hand, as old writers did) still loads.
    rec = _csr()
    old = {"schema_version": 1, "id": rec.id, "task": rec.task, "caption": rec.caption, "truth": list(rec.truth),
           "provenance": rec.provenance, "image_sizes": [len(rec.images[0])]}
    assert R.decode(_raw(old, rec.images[0])) == rec


def test_answer_focus_round_trip_and_refusals():
    """An instruct answer's focus spans survive encode/decode; bad spans are refused by record and key;
    a record without spans has no `answer_focus` header key (older bytes unchanged)."""
    rec = _instruct(answer="<answer>There are three circles.</answer>", answer_focus=[(18, 23), (24, 31)])
    back = R.decode(R.encode(rec))
    assert back == rec and back.answer_focus == ((18, 23), (24, 31))
    assert [back.answer[s:e] for s, e in back.answer_focus] == ["three", "circles"]
    assert "answer_focus" not in _good_header(_instruct())
    for spans in ([(5, 3)], [(0, 999)], [(4, 8), (6, 9)], [(1, True)], [(-1, 2)]):
        with pytest.raises(R.RecordError, match="answer_focus spans must be sorted") as info:
            _instruct(answer="<answer>x y z</answer>", answer_focus=spans)
        assert info.value.reason == "bad_field" and "ins-0001" in str(info.value)
    with pytest.raises(R.RecordError, match="'answer_focus' belongs to task 'instruct'"):
        _csr(answer_focus=[(0, 1)])
    h = _good_header(rec)
    assert _reason(_raw(dict(h, answer_focus="0-5"), rec.images[0])) == "bad_field"
    assert _reason(_raw(dict(h, answer_focus=[7]), rec.images[0])) == "bad_field"
    assert _reason(_raw(dict(h, answer_focus=[[1, 2, 3]]), rec.images[0])) == "bad_field"
