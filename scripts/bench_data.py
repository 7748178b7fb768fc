"""Throughput of the input pipeline (records/s, in-process and with Grain worker processes) and of the
reward (embedded sentences/s), in one run.

    python scripts/bench_data.py [--records 192] [--workers 2] [--tokenizer DIR] [--embedding-model DIR]

Records are synthetic but realistic in size: JPEG/PNG/WebP photos-like gradients of 480x360..800x600,
caption_refine and visual_ops mixed, processed at the default max_pixels (up to 1280 tokens an image).
The first batch (worker start-up) is excluded from the timed part. Numbers depend on the host's free
cores: on a shared 2-core machine, 2 workers cannot beat the in-process threads by much.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def synth_records(n: int) -> list:
    import io

    from PIL import Image, ImageDraw

    from viper_common.records import ViperRecord

    rng = np.random.default_rng(0)
    sizes, fmts = [(480, 360), (640, 480), (800, 600), (600, 800)], ["JPEG", "PNG", "WEBP"]

    def image(i: int, edit: bool = False) -> bytes:
        w, h = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)
        img = Image.fromarray(arr)
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            d.ellipse([x0, y0, x0 + 40, y0 + 30], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        if edit:
            d.rectangle([10, 10, 60, 60], fill=(0, 0, 255))
        buf = io.BytesIO()
        img.save(buf, format=fmts[i % len(fmts)], **({"quality": 90} if fmts[i % 3] != "PNG" else {}))
        return buf.getvalue()

    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(ViperRecord(id=f"v{i}", task="visual_ops", images=[image(i), image(i, True)],
                                   truth=["add a blue square in the top left corner"]))
        else:
            out.append(ViperRecord(id=f"c{i}", task="caption_refine", images=[image(i)],
                                   caption="A colourful gradient with several ellipses of different colours. " * 3,
                                   truth=["There are six ellipses.", "The bottom right is brighter."]))
    return out


def bench_pipeline(shard_glob: str, tokenizer, workers: int, batch_size: int, epochs: int) -> tuple[float, int]:
    from viper_jax.data import get_data_config, make_pipeline

    c = get_data_config()
    c.shard_globs = (shard_glob,)
    c.batch_size, c.num_epochs, c.worker_count = batch_size, epochs, workers
    p = make_pipeline(c, tokenizer, process_index=0, process_count=1)
    try:
        next(p)  # warm-up: worker start-up and first reads
        t0, n = time.perf_counter(), 0
        for batch in p:
            n += len(batch["id"])
        dt = time.perf_counter() - t0
    finally:
        p.close()
    return n / dt, n


def bench_reward(model_path: str, rounds: int) -> tuple[float, int]:
    from viper_jax.rl import get_reward, get_reward_config

    cfg = get_reward_config()
    cfg.embedding_model = model_path
    reward = get_reward("caption_refine", cfg)
    rng = np.random.default_rng(0)
    words = ("red blue green cup dog car sign table left right above below small large wooden metal text "
             "reads open closed two three person window door tree sky").split()

    def sentence() -> str:
        return " ".join(rng.choice(words, size=int(rng.integers(6, 14)))).capitalize() + "."

    prompts, group = 16, 5  # 80 rollouts of 6 sentences against 4 truth sentences each
    truths = [[sentence() for _ in range(4)] for _ in range(prompts)]
    batches = [["<think>x</think><answer>" + " ".join(sentence() for _ in range(6)) + "</answer>"
                for _ in range(prompts * group)] for _ in range(rounds + 1)]
    reward(batches[0], truths)  # warm-up: loads the model
    t0, n = time.perf_counter(), 0
    for responses in batches[1:]:
        out = reward(responses, truths)
        n += int(out.num_sentences.sum()) + sum(len(t) for t in truths)
    return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=192)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--tokenizer", default="", help="tokenizer directory (default: the tiny byte-level one)")
    ap.add_argument("--embedding-model", default="", help="sentence-transformers dir (default: MiniLM)")
    ap.add_argument("--reward-rounds", type=int, default=5)
    args = ap.parse_args()

    from viper_common.records import write_shard
    from viper_jax.data import build_tiny_tokenizer

    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = build_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        recs = synth_records(args.records)
        half = len(recs) // 2
        write_shard(Path(tmp) / "shard-00000.arrayrecord", recs[:half])
        write_shard(Path(tmp) / "shard-00001.arrayrecord", recs[half:])
        mb = sum(len(b) for r in recs for b in r.images) / 2**20
        print(f"data: {len(recs)} records, {mb:.1f} MiB of images, batch {args.batch_size}")
        for workers in sorted({0, args.workers}):
            rate, n = bench_pipeline(str(Path(tmp) / "*.arrayrecord"), tokenizer, workers, args.batch_size,
                                     args.epochs)
            print(f"pipeline, {workers} worker process(es): {rate:.1f} records/s ({n} records timed)")
    rate, n = bench_reward(args.embedding_model, args.reward_rounds)
    print(f"reward ({args.embedding_model or 'all-MiniLM-L6-v2'}, cpu): {rate:.0f} sentences/s ({n} sentences)")


if __name__ == "__main__":
    main()
