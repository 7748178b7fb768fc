"""The Grain input pipeline on real ArrayRecord shards, against transformers' Qwen2.5-VL processor."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from viper_common import prompts as P  # noqa: E402
from viper_common import records as R  # noqa: E402
from viper_jax.data import (Collator, RecordProcessor, TooManySkippedError, build_tiny_tokenizer,  # noqa: E402
                            get_data_config, make_image_processor, make_pipeline)

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16  # at most 16 merged tokens per image: small, fast prompts
BUCKETS = (512, 640, 768)
SIZES = [(97, 64), (64, 97), (120, 90), (56, 56), (200, 40), (33, 80), (150, 150), (81, 47)]
FORMATS = ["PNG", "JPEG", "WEBP"]


def make_image(seed: int, size: tuple[int, int], fmt: str, edit: bool = False) -> bytes:
    """A gradient with a few shapes; `edit` recolours one and removes another (a visual_ops pair)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, rng.integers(256))], -1)
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    box = sorted(rng.integers(0, w, 2).tolist()), sorted(rng.integers(0, h, 2).tolist())
    d.ellipse([box[0][0], box[1][0], box[0][1], box[1][1]], fill=(0, 0, 255) if edit else (255, 0, 0))
    if not edit:
        d.rectangle([w // 4, h // 4, w // 2, h // 2], outline=(255, 255, 0), width=2)
    d.text((2, 2), f"#{seed}", fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return buf.getvalue()


def make_records(n: int, start: int = 0) -> list[R.ViperRecord]:
    out = []
    for i in range(start, start + n):
        size, fmt = SIZES[i % len(SIZES)], FORMATS[i % len(FORMATS)]
        if i % 3 == 2:
            out.append(R.ViperRecord(id=f"vop-{i:03d}", task="visual_ops",
                                     images=[make_image(i, size, fmt), make_image(i, size, FORMATS[(i + 1) % 3], True)],
                                     truth=[f"recolour the ellipse {i} blue", "remove the yellow rectangle"]))
        else:
            out.append(R.ViperRecord(id=f"csr-{i:03d}", task="caption_refine", images=[make_image(i, size, fmt)],
                                     caption=f"A gradient with a red ellipse number {i} and a «yellow» box.",
                                     truth=[f"The label reads #{i}.", "The box outline is yellow."],
                                     provenance={"source": f"img{i}.png"}))
    return out


def write_raw_shard(path, entries: list[bytes]) -> None:
    """Raw entries, bypassing ShardWriter's validation, so that bad records can be planted."""
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for e in entries:
        w.write(e)
    w.close()


def write_shards(directory, recs: list[R.ViperRecord], per_shard: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(recs), per_shard):
        R.write_shard(directory / f"shard-{k // per_shard:05d}.arrayrecord", recs[k:k + per_shard])
    return str(directory / "*.arrayrecord")


def config(globs, **over):
    c = get_data_config()
    c.shard_globs = (globs,) if isinstance(globs, str) else tuple(globs)
    c.min_pixels, c.max_pixels, c.length_buckets = MIN_PIXELS, MAX_PIXELS, BUCKETS
    c.batch_size, c.num_epochs, c.shuffle, c.drop_remainder = 4, 1, False, False
    c.read_threads = 1
    for k, v in over.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def records11():
    return make_records(11)


@pytest.fixture(scope="module")
def shards11(tmp_path_factory, records11):
    return write_shards(tmp_path_factory.mktemp("s11"), records11, per_shard=4)  # 4 + 4 + 3 records


def ids_of(pipeline) -> list[str]:
    return [i for batch in pipeline for i in batch["id"]]


def ref_processor(tok):
    """transformers' own Qwen2.5-VL processor (needs torchvision for its video processor)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
                               tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)


def chat_text(tok, rec: R.ViperRecord, prompt: str | None = None) -> str:
    prompt = prompt or P.TRAINING_PROMPTS[rec.task].replace("{caption}", rec.caption or "")
    content = [{"type": "image"} for _ in rec.images] + [{"type": "text", "text": prompt}]
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def pil(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def split_rows(batch) -> list[dict]:
    """Per-sample views of a batch: unpadded ids/types, and that sample's pixel rows and grids."""
    rows, img0, pix0 = [], 0, 0
    for b, k in enumerate(batch["images_per_sample"]):
        grid = batch["image_grid_thw"][img0:img0 + k]
        n = int(grid.prod(axis=1).sum())
        L = int(batch["prompt_lengths"][b])
        rows.append(dict(ids=batch["input_ids"][b, -L:], mm=batch["mm_token_type_ids"][b, -L:], grid=grid,
                         pixels=batch["pixel_values"][pix0:pix0 + n]))
        img0, pix0 = img0 + k, pix0 + n
    return rows


# -------------------------------------------------------------------------------------------- fidelity

def test_round_trip_fields_and_layout(tok, shards11, records11):
    p = make_pipeline(config(shards11), tok, process_index=0, process_count=1)
    assert p.num_records == 11 and [os.path.basename(x) for x in p.paths] == [
        "shard-00000.arrayrecord", "shard-00001.arrayrecord", "shard-00002.arrayrecord"]
    batches = list(p)
    assert [len(b["id"]) for b in batches] == [4, 4, 3]
    got = [(i, t, tr) for b in batches for i, t, tr in zip(b["id"], b["task"], b["truth"])]
    assert got == [(r.id, r.task, r.truth) for r in records11]
    image_proc = make_image_processor(config(shards11).min_pixels, config(shards11).max_pixels)
    image_id, pad_id = tok.convert_tokens_to_ids("<|image_pad|>"), tok.pad_token_id
    recs = iter(records11)
    for batch in batches:
        B, T = batch["input_ids"].shape
        lengths = batch["prompt_lengths"]
        assert T == min(b for b in BUCKETS if b >= lengths.max())
        for b in range(B):  # left padding
            L = lengths[b]
            np.testing.assert_array_equal(batch["attention_mask"][b], [0] * (T - L) + [1] * L)
            assert (batch["input_ids"][b, :T - L] == pad_id).all()
        np.testing.assert_array_equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_id) * batch["attention_mask"])
        assert batch["num_patches"] == batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(axis=1).sum()
        for row in split_rows(batch):
            rec = next(recs)
            ref = image_proc(images=[pil(x) for x in rec.images], return_tensors="np")
            np.testing.assert_array_equal(row["pixels"], ref["pixel_values"])
            np.testing.assert_array_equal(row["grid"], ref["image_grid_thw"])
            assert (row["ids"] == image_id).sum() == row["grid"].prod(axis=1).sum() // 4


def test_matches_transformers_processor(tok, records11):
    proc = ref_processor(tok)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    for rec in (records11[0], records11[2]):  # caption_refine (1 image), visual_ops (2 images)
        ref = proc(text=[chat_text(tok, rec)], images=[pil(x) for x in rec.images], return_tensors="np")
        rp = RecordProcessor(tok, make_image_processor(MIN_PIXELS, MAX_PIXELS), P.TRAINING_PROMPTS, max_length=BUCKETS[-1])
        ex = rp(R.encode(rec))
        batch = Collator(BUCKETS, tok.pad_token_id, image_id, tok.convert_tokens_to_ids("<|video_pad|>"))([ex])
        row = split_rows(batch)[0]
        np.testing.assert_array_equal(row["ids"], ref["input_ids"][0])
        np.testing.assert_array_equal(row["mm"], ref["mm_token_type_ids"][0])
        np.testing.assert_array_equal(batch["attention_mask"][0, -len(row["ids"]):], ref["attention_mask"][0])
        np.testing.assert_array_equal(batch["pixel_values"], ref["pixel_values"])
        np.testing.assert_array_equal(batch["image_grid_thw"], ref["image_grid_thw"])
        assert len(rec.images) == len(ref["image_grid_thw"])


def test_prompt_overrides(tok, shards11, records11):
    c = config(shards11, batch_size=1)
    c.prompts.caption_refine = "Fix {caption} -- {keep these braces}"
    batch = next(iter(make_pipeline(c, tok, process_index=0, process_count=1)))
    text = tok.decode(split_rows(batch)[0]["ids"])
    assert f"Fix {records11[0].caption} -- {{keep these braces}}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n") and text.startswith("<|im_start|>system\n")
    c.prompts.unknown_task = "x"
    with pytest.raises(KeyError, match="unknown prompt key"):
        make_pipeline(c, tok, process_index=0, process_count=1)


def test_patch_buckets_pad_pixels_only(tok, shards11):
    plain = list(make_pipeline(config(shards11), tok, process_index=0, process_count=1))
    padded = list(make_pipeline(config(shards11, patch_buckets=(64, 128)), tok, process_index=0, process_count=1))
    for a, b in zip(plain, padded):
        n = int(a["num_patches"])
        assert b["num_patches"] == n and b["pixel_values"].shape[0] == (64 if n <= 64 else 128 * -(-n // 128))
        np.testing.assert_array_equal(b["pixel_values"][:n], a["pixel_values"])
        assert not b["pixel_values"][n:].any()
        for key in ("input_ids", "image_grid_thw", "mm_token_type_ids"):
            np.testing.assert_array_equal(a[key], b[key])


# -------------------------------------------------------------------------------- order, epochs, restore

def test_shuffled_epochs_each_record_once(tok, shards11, records11):
    c = config(shards11, shuffle=True, num_epochs=3, batch_size=1, seed=7)
    ids = ids_of(make_pipeline(c, tok, process_index=0, process_count=1))
    all_ids = sorted(r.id for r in records11)
    epochs = [ids[k:k + 11] for k in range(0, 33, 11)]
    assert len(ids) == 33 and all(sorted(e) == all_ids for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # a fresh permutation every epoch
    assert epochs[0] != [r.id for r in records11]
    assert ids == ids_of(make_pipeline(c, tok, process_index=0, process_count=1))  # seeded: reproducible
    c.seed = 8
    assert ids != ids_of(make_pipeline(c, tok, process_index=0, process_count=1))


def _bad_entries() -> dict[str, bytes]:
    """One raw entry per skip kind (ids bad-<kind>)."""
    def header_of(rec):
        data = R.encode(rec)
        (n,) = np.frombuffer(data[4:8], "<u4")
        return json.loads(data[8:8 + n]), data[8 + n:]

    def raw(header, body):
        head = json.dumps(header).encode()
        return R.MAGIC + np.uint32(len(head)).tobytes() + head + body

    base = make_records(1, start=40)[0]
    jpeg = make_image(40, (120, 90), "JPEG")
    out = {}
    out["truncated"] = R.encode(dataclasses.replace(base, id="bad-truncated"))[:-25]
    h, body = header_of(base)
    cut = jpeg[: len(jpeg) // 2]  # the record is consistent; the JPEG inside it is cut in half
    out["bad_image"] = raw(dict(h, id="bad-bad_image", image_sizes=[len(cut)]), cut)
    out["missing_field"] = raw({k: v for k, v in dict(h, id="bad-missing_field").items() if k != "truth"}, body)
    out["schema_version"] = raw(dict(h, id="bad-schema_version", schema_version=99), body)
    out["too_long"] = raw(dict(h, id="bad-too_long", caption="word " * 200), body)
    out["bad_prompt"] = raw(dict(h, id="bad-bad_prompt", caption="see <|vision_start|> here"), body)
    out["surrogate"] = raw(dict(h, id="bad-surrogate", caption="lone \ud800 surrogate"), body)  # the tokenizer raises
    return out


BAD = _bad_entries()


@pytest.mark.parametrize("kind, reason", [(k, k) for k in ("truncated", "bad_image", "missing_field", "schema_version",
                                                            "too_long", "bad_prompt")] + [("surrogate", "bad_prompt")])
def test_bad_record_skipped_counted_logged(tok, tmp_path, kind, reason, caplog):
    good = make_records(5, start=20)
    entries = [R.encode(r) for r in good]
    entries.insert(2, BAD[kind])
    write_raw_shard(tmp_path / "s.arrayrecord", entries)
    p = make_pipeline(config(str(tmp_path / "*.arrayrecord"), max_skip_fraction=0.5, min_seen_for_skip_check=1),
                      tok, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="viper_jax.data.pipeline"):
        assert ids_of(p) == [r.id for r in good]  # nothing good dropped, order kept
    assert p.stats.as_dict() == {"seen": 6, "skipped": {reason: 1}}
    assert f"bad-{kind}" in caplog.text and f"[{reason}]" in caplog.text
    p.close()  # a fresh iterator starts with fresh counts
    assert ids_of(p) == [r.id for r in good] and p.stats.as_dict() == {"seen": 6, "skipped": {reason: 1}}


def test_max_skip_fraction_raises_with_counts(tok, tmp_path):
    good = [R.encode(r) for r in make_records(4, start=30)]
    entries = [good[0], BAD["truncated"], good[1], BAD["schema_version"], good[2], BAD["bad_image"], good[3]]
    write_raw_shard(tmp_path / "s.arrayrecord", entries)
    glob_ = str(tmp_path / "*.arrayrecord")
    p = make_pipeline(config(glob_, batch_size=1, max_skip_fraction=0.25, min_seen_for_skip_check=4), tok,
                      process_index=0, process_count=1)
    with pytest.raises(TooManySkippedError) as info:
        ids_of(p)
    # seen 4 (good, truncated, good, schema_version): 2/4 > 25%
    assert "2 of 4" in str(info.value) and "'truncated': 1" in str(info.value) and "'schema_version': 1" in str(info.value)
    # below the minimum count nothing is enforced: all good records come through
    p = make_pipeline(config(glob_, max_skip_fraction=0.25, min_seen_for_skip_check=100), tok,
                      process_index=0, process_count=1)
    assert len(ids_of(p)) == 4 and p.stats.num_skipped == 3


def test_restore_continues_exactly(tok, tmp_path, records11):
    entries = [R.encode(r) for r in records11]
    entries.insert(5, BAD["truncated"])  # a skip before the checkpoint: the counts must be restored too
    write_raw_shard(tmp_path / "a.arrayrecord", entries[:6])
    write_raw_shard(tmp_path / "b.arrayrecord", entries[6:])
    c = config(str(tmp_path / "*.arrayrecord"), shuffle=True, num_epochs=None, batch_size=3, seed=3,
               max_skip_fraction=0.5, min_seen_for_skip_check=1)
    p = make_pipeline(c, tok, process_index=0, process_count=1)
    for _ in range(5):  # crosses the first epoch boundary (12 entries) before the checkpoint
        next(p)
    state = json.loads(json.dumps(p.get_state()))  # a checkpoint is JSON
    stats_then = p.stats.as_dict()
    assert stats_then["skipped"] == {"truncated": 1}
    expected = [next(p) for _ in range(6)]

    q = make_pipeline(c, tok, process_index=0, process_count=1)
    q.set_state(state)
    assert q.stats.as_dict() == stats_then
    for want, got in zip(expected, [next(q) for _ in range(6)]):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert q.stats.as_dict() == p.stats.as_dict()


def test_two_process_sharding_covers_everything_once(tok, shards11, records11):
    seen = []
    for i in range(2):
        p = make_pipeline(config(shards11, shuffle=True, seed=1), tok, process_index=i, process_count=2)
        assert p.num_records == (6, 5)[i]
        seen.append(ids_of(p))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(r.id for r in records11)
    with pytest.raises(ValueError, match="process_index"):
        make_pipeline(config(shards11), tok, process_index=2, process_count=2)


@pytest.mark.slow  # ~40 s here: each grain worker is a spawned process that imports jax and transformers
def test_multiprocess_workers_same_batches_and_restorable(tok, shards11):
    c = config(shards11, shuffle=True, num_epochs=2, batch_size=2, seed=5)
    inproc = list(make_pipeline(c, tok, process_index=0, process_count=1))
    c.worker_count = 2
    p = make_pipeline(c, tok, process_index=0, process_count=1)
    try:
        first = [next(p) for _ in range(4)]
        state = p.get_state()
        rest = list(p)
    finally:
        p.close()
    for want, got in zip(inproc, first + rest, strict=True):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        assert list(got["id"]) == list(want["id"])
    q = make_pipeline(c, tok, process_index=0, process_count=1)
    try:
        q.set_state(state)
        assert [list(b["id"]) for b in q] == [list(b["id"]) for b in rest]
    finally:
        q.close()


# ---------------------------------------------------------------------------------------------- plumbing

def test_shard_glob_errors_and_order(tok, tmp_path, shards11):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        make_pipeline(config([shards11, str(tmp_path / "none-*.arrayrecord")]), tok, process_index=0, process_count=1)
    d = os.path.dirname(shards11)
    p = make_pipeline(config([os.path.join(d, "shard-00002*"), shards11]), tok, process_index=0, process_count=1)
    assert [os.path.basename(x)[:11] for x in p.paths] == ["shard-00002", "shard-00000", "shard-00001"]


def test_tiny_tokenizer_round_trips(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>héllo 🙂<|im_end|>"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.chat_template == tok.chat_template and back.pad_token == "<|endoftext|>" and back.eos_token == "<|im_end|>"
    ids = tok("héllo", add_special_tokens=False)["input_ids"]
    assert ids == list("héllo".encode())  # one token per byte, id == byte value
    assert tok.decode(tok(text)["input_ids"]) == text


def test_data_package_imports_without_jax():
    code = ("import sys, viper_jax.data, viper_jax.data.processing; "
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
