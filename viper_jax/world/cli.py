"""`viper world`: ShapeWorld's held-out benchmark (`bench`) and the base model's data and tokenizer (`data`).

  viper world bench --out DIR [--n_per_category N] [--val_per_category N] [--size PX]
      DIR/shapeworld_test.tsv, DIR/shapeworld_val.tsv (score with `viper eval --tsv ...`), DIR/manifest.json
  viper world data --out DIR --n N [--size PX] [--vocab_size V] [--workers W]
      [--weights describe=..,ask=..,compare=..,choose=..]
      DIR/base_data/ (instruct records, resumable shards + manifest.json), DIR/tokenizer/ (HF tokenizer),
      DIR/tokenizer_report.json (tokens per caption, world tokenizer vs byte tokenizer)

  viper world images --out DIR --n N [--block K] [--size PX]
      DIR/*.png: N unlabelled source images for ViPER's synthesis, block K of the `synth` seed range (a round
      of `viper loop` takes its own block); each PNG carries its scene for the simulators only

  viper world shuffle-truth --records DIR --out DIR [--seed S]
      the shuffled-truth control (issue 18): every shard under DIR rewritten with the truth sentences permuted
      across records of the same task, nothing else changed (viper_common/shapeworld/controls.py)

  viper world base --workdir DIR [--config configs/world_base.py] [--config.a.b=value ...]
      the base model: data + tokenizer + a random-init tiny Qwen2.5-VL trained with `viper sft`, exported
      to DIR/base_hf (viper_jax/world/base.py)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from viper_common.atomic_files import write_json_atomic

CAPTIONS_MEASURED = 500


def add_world_args(sub: argparse._SubParsersAction) -> None:
    world = sub.add_parser("world", help="ShapeWorld: the held-out benchmark, the base model's data and tokenizer")
    action = world.add_subparsers(dest="world_action", required=True)
    bench = action.add_parser("bench", help="write the benchmark TSVs (test and val splits)")
    bench.add_argument("--out", required=True, help="folder for the TSVs and manifest.json")
    bench.add_argument("--n_per_category", type=int, default=None, help="test questions per category (default 175)")
    bench.add_argument("--val_per_category", type=int, default=None, help="val questions per category (default 50)")
    bench.add_argument("--size", type=int, default=112, help="image side in pixels")
    data = action.add_parser("data", help="write the base model's SFT records and the world tokenizer")
    data.add_argument("--out", required=True, help="folder for base_data/, tokenizer/ and tokenizer_report.json")
    data.add_argument("--n", type=int, required=True, help="number of training examples")
    data.add_argument("--size", type=int, default=112, help="image side in pixels")
    data.add_argument("--vocab_size", type=int, default=None, help="BPE vocabulary size (default 1024)")
    data.add_argument("--tokenizer_scenes", type=int, default=2000, help="scenes whose text trains the tokenizer")
    images = action.add_parser("images", help="write unlabelled source images for synthesis (synth seed range)")
    images.add_argument("--out", required=True, help="folder for the PNGs")
    images.add_argument("--n", type=int, required=True, help="number of images")
    images.add_argument("--block", type=int, default=0, help="block of --n seeds of the synth range (default 0)")
    images.add_argument("--size", type=int, default=112, help="image side in pixels")
    shuffle = action.add_parser("shuffle-truth", help="copy synthesised records with truth permuted across records "
                                                      "of the same task (the shuffled-truth control)")
    shuffle.add_argument("--records", required=True, help="synthesis output folder (its <task>-*/part-* shards)")
    shuffle.add_argument("--out", required=True, help="folder for the shuffled copy (same layout)")
    shuffle.add_argument("--seed", type=int, default=0, help="seed of the permutation")
    base = action.add_parser("base", help="build the base model: data, tokenizer, `viper sft` from random init",
                             description="Extra arguments --config.a.b=value override single config fields.")
    base.add_argument("--workdir", required=True, help="data/, init_model/, sft/, base_hf/ and base.json go here")
    base.add_argument("--config", default=None, help="Python config file with get_config() (default: the schema's "
                                                      "defaults, as configs/world_base.py)")
    base.set_defaults(accepts_config_overrides=True)
    data.add_argument("--workers", type=int, default=1, help="processes writing shards (images are rendered on CPU)")
    data.add_argument("--weights", default=None,
                      help="mix of example kinds, e.g. describe=0.4,ask=0.3,compare=0.3,choose=0 (unnamed kinds keep "
                           "base_data.DEFAULT_WEIGHTS)")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise SystemExit(f"viper world: {name} must be >= 1, got {value}")


def _weights(text: str | None) -> dict[str, float] | None:
    from viper_common.shapeworld.base_data import KINDS

    if not text:
        return None
    out = {}
    for item in text.split(","):
        kind, _, value = item.partition("=")
        try:
            out[kind.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"viper world: --weights item {item!r} is not kind=number") from None
        if kind.strip() not in KINDS or out[kind.strip()] < 0:
            raise SystemExit(f"viper world: --weights item {item!r}: kinds are {KINDS}, weights >= 0")
    return out


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from viper_common.shapeworld import bench

    _positive("--n_per_category", args.n_per_category)
    _positive("--val_per_category", args.val_per_category)
    if args.size < 28:
        raise SystemExit(f"viper world: --size must be >= 28 pixels (two 14 px patches), got {args.size}")
    paths = {}
    for split, n in (("test", args.n_per_category), ("val", args.val_per_category)):
        start = time.perf_counter()
        paths[split] = str(bench.write_benchmark(args.out, split, n, size=args.size))
        print(f"wrote {paths[split]} in {time.perf_counter() - start:.1f} s")
    manifest = json.loads((Path(args.out) / bench.MANIFEST_NAME).read_text())
    for split, entry in sorted(manifest["splits"].items()):
        cats = ", ".join(f"{c} {v['count']} (chance {100 * v['chance']:.0f}%)" for c, v in entry["categories"].items())
        print(f"  {split}: {entry['num_questions']} questions: {cats}")
    return paths


def run_data(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from viper_common.shapeworld import base_data, language
    from viper_common.shapeworld.scene import sample_scene
    from viper_common.shapeworld.splits import SEED_RANGES
    from viper_common.tiny_tokenizer import build_tiny_tokenizer
    from viper_jax.world import tokenizer as world_tokenizer

    _positive("--n", args.n)
    _positive("--tokenizer_scenes", args.tokenizer_scenes)
    weights = _weights(args.weights)
    out = Path(args.out)
    start = time.perf_counter()
    _positive("--workers", args.workers)
    try:
        base_data.write_base_data(out / "base_data", args.n, size=args.size, weights=weights, workers=args.workers)
    except ValueError as e:  # a folder written with other settings
        raise SystemExit(f"viper world: {e}") from None
    print(f"wrote {args.n} base examples to {out / 'base_data'} in {time.perf_counter() - start:.1f} s")
    vocab = args.vocab_size or world_tokenizer.DEFAULT_VOCAB_SIZE
    try:
        tok = world_tokenizer.build_world_tokenizer(out / "tokenizer", world_tokenizer.world_texts(args.tokenizer_scenes),
                                                    vocab)
    except ValueError as e:
        raise SystemExit(f"viper world: {e}") from None
    # Measured on captions of scenes the tokenizer never saw (the synth range).
    captions = []
    for k in range(CAPTIONS_MEASURED):
        rng = np.random.default_rng(SEED_RANGES["synth"].start + k)
        captions.append(language.caption(sample_scene(rng), rng))
    report = {"vocab_size": len(tok), "captions": len(captions),
              "tokens_per_caption": world_tokenizer.tokens_per_text(tok, captions),
              "bytes_per_caption": world_tokenizer.tokens_per_text(build_tiny_tokenizer(), captions)}
    report["ratio"] = report["bytes_per_caption"] / report["tokens_per_caption"]
    write_json_atomic(out / "tokenizer_report.json", report, indent=2)
    print(f"wrote {out / 'tokenizer'}: vocabulary {len(tok)}, {report['tokens_per_caption']:.1f} tokens per caption "
          f"vs {report['bytes_per_caption']:.1f} with the byte tokenizer ({report['ratio']:.1f}x shorter)")
    return report


def run_images(args: argparse.Namespace) -> Path:
    import numpy as np

    from viper_common.atomic_files import write_bytes_atomic
    from viper_common.shapeworld import render
    from viper_common.shapeworld.scene import sample_scene
    from viper_common.shapeworld.splits import seed_block

    _positive("--n", args.n)
    try:
        seeds = seed_block("synth", args.block, args.n)
    except ValueError as e:
        raise SystemExit(f"viper world: --block / --n: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # a rerun rewrites nothing it already has
        path = out / f"synth-{seed}.png"
        if not path.exists():
            write_bytes_atomic(path, render.render_png(sample_scene(np.random.default_rng(seed)), seed, args.size))
    print(f"{args.n} source images (synth seeds {seeds.start}..{seeds.stop - 1}) in {out}")
    return out


def run_base(args: argparse.Namespace) -> dict[str, Any]:
    from viper_common.config_overrides import ConfigError, apply_overrides
    from viper_jax.data.pipeline import TooManySkippedError
    from viper_jax.train.trainer import log_to_console
    from viper_jax.world import base

    log_to_console()
    try:  # a user's mistake is one line naming the key or file, not a traceback
        config = base.load_config(args.config) if args.config else base.base_config()
        apply_overrides(config, getattr(args, "overrides", []) or [])
        config.workdir = args.workdir
        summary = base.build_base(config)
    except (ConfigError, TooManySkippedError) as e:
        raise SystemExit(f"viper world base: {e}") from None
    sft = summary["sft"]
    print(f"base model: {summary['base_hf']} (sft {sft.get('steps')} steps, loss {sft.get('first_loss', 0):.3f} -> "
          f"{sft.get('last_loss', 0):.3f}, {sft.get('tokens_per_s', 0):.0f} tokens/s; seconds {summary['seconds']})")
    return summary


def run_shuffle_truth(args: argparse.Namespace) -> dict[str, Any]:
    from viper_common.records import RecordError
    from viper_common.shapeworld.controls import shuffle_truth

    try:
        summary = shuffle_truth(args.records, args.out, args.seed)
    except (FileNotFoundError, ValueError, RecordError) as e:
        raise SystemExit(f"viper world shuffle-truth: {e}") from None
    for task, t in summary["tasks"].items():
        print(f"  {task}: {t['records']} records, truth permuted (unshuffled {t['unshuffled']}, "
              f"same content {t['same_content']})")
    print(f"shuffled copy of {args.records} in {args.out}")
    return summary


def run_world(args: argparse.Namespace) -> Any:
    if args.world_action == "base":  # its own errors name the config key or the workdir
        return run_base(args)
    try:
        if args.world_action == "bench":
            return run_bench(args)
        if args.world_action == "data":
            return run_data(args)
        if args.world_action == "shuffle-truth":
            return run_shuffle_truth(args)
        if args.world_action == "images":
            return run_images(args)
    except OSError as e:  # an --out that is a file, a full or read-only disk
        raise SystemExit(f"viper world {args.world_action}: cannot write {args.out}: {e}") from None
    raise SystemExit(f"viper world: unknown action {args.world_action!r}")  # argparse's choices prevent this
