"""`viper eval`: greedy answers to benchmark TSVs through the JAX rollout engine, scored per category.

Rows are sorted by (image grids, prompt length) before batching, so that a batch's prompts land in one
length bucket and, on benchmarks with repeated image sizes, consecutive batches share a compiled program
(the engine compiles once per prompt bucket, batch size and image-grid set).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from viper_common.atomic_files import write_json_atomic
from viper_jax.data.processing import Prompt, PromptError, bucket_for
from viper_jax.evaluation import answers, likelihood
from viper_jax.evaluation.tsv import EvalRow, SkippedRow, read_tsv
from viper_jax.inference import (DEFAULT_BUCKETS, Session, add_model_args, generate_batch, rollout_config,
                                 session_from_args)


@dataclasses.dataclass
class FileResult:
    path: str
    predictions: list[dict[str, Any]]
    skipped: list[SkippedRow]
    seconds: float
    generated_tokens: int
    compiled_shapes: int  # distinct (batch, bucket, image grids): each one compiles the engine once


    def to_dict(self) -> dict[str, Any]:
        overall, per = answers.score(self.predictions)
        reasons = collections.Counter(s.reason for s in self.skipped)
        out = {"path": self.path, "overall": overall.to_dict(),
               "categories": {k: v.to_dict() for k, v in per.items()}}
        if self.predictions and "option_choice" in self.predictions[0]:
            o, c = answers.score(likelihood.option_predictions(self.predictions))
            out["option_scoring"] = {"overall": o.to_dict(), "categories": {k: v.to_dict() for k, v in c.items()},
                                     "forced_prefix": sum(p["forced_prefix"] for p in self.predictions)}
        return {**out,
                "skipped": {"count": len(self.skipped), "by_reason": dict(sorted(reasons.items())),
                            "rows": [dataclasses.asdict(s) for s in self.skipped]},
                "seconds": self.seconds, "generated_tokens": self.generated_tokens,
                "compiled_shapes": self.compiled_shapes,
                "predictions": self.predictions}


def _prompts(session: Session, rows: Sequence[EvalRow], max_length: int
             ) -> tuple[list[tuple[EvalRow, Prompt]], list[SkippedRow]]:
    ok, skipped = [], []
    for row in rows:
        try:
            prompt = session.prompt(row.open_images(), row.prompt())
        except PromptError as e:
            skipped.append(SkippedRow(row.index, e.reason, str(e)))
            continue
        if len(prompt.input_ids) > max_length:
            skipped.append(SkippedRow(row.index, "too_long", f"prompt is {len(prompt.input_ids)} tokens, largest "
                                                             f"bucket {max_length} (raise --prompt_buckets)"))
            continue
        ok.append((row, prompt))
    return ok, skipped


def evaluate_file(session: Session, path: str | Path, *, batch_size: int = 8, max_new_tokens: int = 32,
                  buckets: Sequence[int] = DEFAULT_BUCKETS, limit: int | None = None,
                  log: Any = None, score_options: str | None = None) -> FileResult:
    """Generates for every row of the TSV at `path`; progress lines go to `log` (default: sys.stderr at call time).
    `score_options` ("text" / "letter") also picks each row's option by likelihood (likelihood.py)."""
    log = log or sys.stderr
    data = read_tsv(path, limit)
    cfg = rollout_config(session, max_new_tokens, buckets)  # greedy (temperature 0)
    items, skipped = _prompts(session, data.rows, cfg.prompt_buckets[-1])
    items.sort(key=lambda it: (it[1].image_grid_thw.tolist(), len(it[1].input_ids)))
    predictions: list[dict[str, Any]] = []
    start, generated, shapes = time.perf_counter(), 0, set()
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        width = bucket_for(max(len(p.input_ids) for _, p in chunk), cfg.prompt_buckets)
        shapes.add((len(chunk), width, tuple(tuple(g) for _, p in chunk for g in p.image_grid_thw.tolist())))
        result = generate_batch(session, [p for _, p in chunk], cfg)
        generated += int(result.lengths.sum())
        for r, (row, prompt) in enumerate(chunk):
            response = session.decode(result.tokens[r], result.lengths[r])
            extracted = answers.extract(response, row.options)
            predictions.append({"index": row.index, "category": row.category, "kind": row.kind,
                                "answer": row.answer, "response": response, "extracted": extracted,
                                "correct": extracted == row.answer, "formatted": answers.well_formed(response),
                                "chance": answers.chance(row.options)})
            if score_options:
                scored = likelihood.score_row(session, prompt, response, row.options, score_options)
                predictions[-1].update(option_choice=scored.choice, option_correct=scored.choice == row.answer,
                                       option_logprobs=scored.logprobs, forced_prefix=scored.forced_prefix)
        print(f"  {Path(path).name}: {min(b + batch_size, len(items))}/{len(items)} rows", file=log, flush=True)
    order = {row.index: n for n, row in enumerate(data.rows)}
    predictions.sort(key=lambda p: order[p["index"]])
    return FileResult(str(path), predictions, data.skipped + skipped, time.perf_counter() - start, generated,
                      len(shapes))


def format_summary(name: str, summary: dict[str, Any]) -> str:
    o = summary["overall"]
    lines = [f"{name}: accuracy {100 * o['accuracy']:.2f}% ({o['correct']}/{o['total']}, chance "
             f"{100 * o['chance']:.1f}%), unparsed {o['unparsed']}, format {100 * o['format_rate']:.0f}%, "
             f"skipped {summary['skipped']['count']} {summary['skipped']['by_reason'] or ''}".rstrip(),
             f"  [{summary['generated_tokens']} tokens in {summary['seconds']:.1f} s, "
             f"{summary['compiled_shapes']} compiled shape(s)]"]
    width = max((len(c) for c in summary["categories"]), default=0)
    for cat, a in summary["categories"].items():
        lines.append(f"  {cat:<{width}}  {100 * a['accuracy']:6.2f}%  ({a['correct']}/{a['total']}, chance "
                     f"{100 * a['chance']:.1f}%, unparsed {a['unparsed']}, format {100 * a['format_rate']:.0f}%)")
    scoring = summary.get("option_scoring")
    if scoring:
        o = scoring["overall"]
        lines.append(f"  options by likelihood: {100 * o['accuracy']:.2f}% ({o['correct']}/{o['total']}), "
                     f"prefix completed {scoring['forced_prefix']}")
        for cat, a in scoring["categories"].items():
            lines.append(f"    {cat:<{width}}  {100 * a['accuracy']:6.2f}%  ({a['correct']}/{a['total']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ viper eval

def add_eval_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy on multiple-choice / yes-no benchmark TSVs (VLMEvalKit format)")
    add_model_args(p)
    p.add_argument("--tsv", action="append", required=True, help="benchmark TSV (repeat for several)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of each file (smoke tests)")
    p.add_argument("--out", default=None, help="results JSON (summaries and every prediction)")
    p.add_argument("--score_options", choices=likelihood.OPTION_FORMS, default=None,
                   help="also choose each row's option by likelihood, scoring the option texts or letters as the "
                        "answer (viper_jax/evaluation/likelihood.py)")


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    names = [Path(t).stem for t in args.tsv]
    if len(set(names)) != len(names):
        names = [str(t) for t in args.tsv]
    for t in args.tsv:  # fail on a missing file before loading the model
        if not Path(t).is_file():
            raise SystemExit(f"no such TSV: {t}")
    session = session_from_args(args)
    results: dict[str, Any] = {
        "model": str(args.model), "settings": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                                               "min_pixels": args.min_pixels, "max_pixels": args.max_pixels,
                                               "dtype": args.dtype, "limit": args.limit, "greedy": True,
                                               "score_options": args.score_options},
        "files": {}}
    for name, tsv in zip(names, args.tsv):
        result = evaluate_file(session, tsv, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               buckets=args.prompt_buckets, limit=args.limit, score_options=args.score_options)
        results["files"][name] = result.to_dict()
        print(format_summary(name, results["files"][name]))
        if args.out:  # after every file, so a long run keeps what it has
            _write(args.out, results)
    return results


def _write(path: str | Path, results: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results, indent=1, ensure_ascii=False)
