"""Aggregation of the ViPER experiment (issue 18, scripts/reproduce.py): `viper eval` JSONs and training
`metrics.jsonl` files -> results.json (one row per model) and report.md (the paper's table, mean +- std over
seeds; reward and format-rate curves; examples; the issue's goals, measured).

Everything here reads files only (no JAX, no model): `build_report` can be rerun at any time on a partial run.

A model is described by a spec dict: name, kind ("base", "viper round R", "sft", "stage1", "stage2", "shuffled"),
seed (None for the base), round (viper rounds), eval (its `viper eval --out` JSON), metrics (its training
metrics.jsonl, absent for the base), trainer ("grpo" or "sft").
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from viper_jax.world.report_examples import bench_examples, examples_markdown, synth_examples  # noqa: F401

CATEGORIES = ("coarse", "fine", "counting", "spatial", "multi_image", "hallucination")
SPLITS = ("val", "test")
KIND_LABELS = {"base": "base", "sft": "+ ViPER-data SFT (control)", "stage1": "stage 1 only (control)",
               "stage2": "stage 2 only (control)", "shuffled": "shuffled truth (control)",
               "viper best": "ViPER, best round by val"}
STAGES = ("caption_refine", "visual_ops")


# ------------------------------------------------------------------------------------------------ eval files

def split_name(file_key: str) -> str:
    """'shapeworld_val' -> 'val' (the key `viper eval` gives each TSV: its stem)."""
    stem = Path(file_key).stem
    for split in SPLITS:
        if stem == split or stem.endswith(f"_{split}"):
            return split
    return stem


def hallucination_rate(predictions: Iterable[dict[str, Any]], category: str = "hallucination") -> float | None:
    """POPE's measure: of the questions about an absent object (answer 'no'), the share answered 'yes'
    (`extracted`, what viper eval read from the response). None when the split has no such question."""
    absent = [p for p in predictions if p.get("category") == category and str(p.get("answer")).lower() == "no"]
    if not absent:
        return None
    return sum(str(p.get("extracted") or "").lower() == "yes" for p in absent) / len(absent)


def summarize_file(result: dict[str, Any]) -> dict[str, Any]:
    """One split of a viper eval JSON -> per-category accuracy, their mean, micro accuracy, hallucination rate."""
    cats = {c: v["accuracy"] for c, v in result.get("categories", {}).items()}
    ordered = {c: cats[c] for c in CATEGORIES if c in cats} | {c: v for c, v in cats.items() if c not in CATEGORIES}
    overall = result.get("overall", {})
    return {"categories": ordered,
            "average": statistics.fmean(ordered.values()) if ordered else None,
            "accuracy": overall.get("accuracy"), "format_rate": overall.get("format_rate"),
            "unparsed": overall.get("unparsed"), "questions": overall.get("total"),
            "hallucination_rate": hallucination_rate(result.get("predictions", []))}


OPTIONS_SUFFIX = "_options"  # a split scored by option likelihood (viper eval --score_options): "test_options"


def options_view(result: dict[str, Any]) -> dict[str, Any] | None:
    """A viper eval file result as scored by option likelihood (its option_scoring and option choices), or None."""
    scoring = result.get("option_scoring")
    if not scoring:
        return None
    from viper_jax.evaluation.likelihood import option_predictions

    return {**scoring, "predictions": option_predictions(result.get("predictions", []))}


def summarize_eval(path: str | Path) -> dict[str, dict[str, Any]]:
    """{split: summarize_file(...)} of a `viper eval --out` JSON, plus {split + OPTIONS_SUFFIX: ...} for the
    files scored by option likelihood too."""
    data = json.loads(Path(path).read_text())
    out = {split_name(k): summarize_file(v) for k, v in data.get("files", {}).items()}
    for k, v in data.get("files", {}).items():
        view = options_view(v)
        if view is not None:
            out[split_name(k) + OPTIONS_SUFFIX] = summarize_file(view)
    return out


# ------------------------------------------------------------------------------------------------ metrics files

def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a last line cut short by a kill is dropped; a missing file is []."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise
        if isinstance(row, dict):
            rows.append(row)
    return rows


def seconds_per_step(rows: Sequence[dict[str, Any]], trainer: str = "grpo") -> float | None:
    """Mean wall seconds of a training step: `time/step_s` (viper train) or `seconds` (viper sft), without the
    run's first step (compiles) when there are others. With resumed runs, every restart's first step is left out."""
    key = "time/step_s" if trainer == "grpo" else "seconds"
    timed = [r for r in rows if isinstance(r.get(key), (int, float))]
    steady = [r for r in timed if "first_step_seconds" not in r] or timed
    return statistics.fmean(r[key] for r in steady) if steady else None


def curves(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """{stage: {"step": per-stage step, "reward": reward/mean, "format_rate": ...}} of a viper train metrics.jsonl."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if "reward/mean" not in r:
            continue
        c = out.setdefault(str(r.get("stage", "?")), {"step": [], "reward": [], "format_rate": []})
        c["step"].append(r.get("stage_step", r.get("step")))
        c["reward"].append(r["reward/mean"])
        c["format_rate"].append(r.get("format_rate", math.nan))
    return out


SIGNAL_KEYS = {"reward": "reward/mean", "format_rate": "format_rate", "zero_spread": "groups/zero_spread_rate",
               "response_tokens": "response_length/mean"}


def grpo_signal(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Means over a viper train run's steps of what GRPO learns from (SIGNAL_KEYS), and whether every group of
    every step had zero reward spread: then every advantage, hence the update, was zero."""
    steps = [r for r in rows if "reward/mean" in r]
    if not steps:
        return None
    out: dict[str, Any] = {k: statistics.fmean(r.get(key, math.nan) for r in steps) for k, key in SIGNAL_KEYS.items()}
    out["no_signal"] = all(r.get("groups/zero_spread_rate") == 1.0 for r in steps)
    return out


# ------------------------------------------------------------------------------------------------ rows

def model_row(spec: dict[str, Any]) -> dict[str, Any] | None:
    """results.json's row of one model, or None when its eval JSON is not there (yet)."""
    path = Path(spec["eval"])
    if not path.exists():
        return None
    splits = summarize_eval(path)
    rows = read_jsonl(spec["metrics"]) if spec.get("metrics") else []
    trainer = spec.get("trainer", "grpo")
    test = splits.get("test", {})
    return {"name": spec["name"], "kind": spec["kind"], "seed": spec.get("seed"), "round": spec.get("round"),
            "model": spec.get("model"), "eval": str(path),
            "val": splits.get("val"), "test": splits.get("test"),
            **{k: v for k, v in splits.items() if k.endswith(OPTIONS_SUFFIX)},
            "average": test.get("average"), "hallucination_rate": test.get("hallucination_rate"),
            "seconds_per_step": seconds_per_step(rows, trainer) if rows else None,
            "train_steps": max((r.get("step", 0) for r in rows), default=0) if rows else None,
            "trainer": trainer if spec.get("metrics") else None,
            "grpo_signal": grpo_signal(rows) if trainer == "grpo" else None,
            "stages_skipped": skipped_stages(spec.get("status"))}


def skipped_stages(status_path: str | None) -> list[str]:
    """The stages a `viper loop` round left out of its training (no records; loop empty_stage=skip)."""
    try:
        steps = json.loads(Path(status_path).read_text())["steps"] if status_path else {}
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return []
    return [k.removeprefix("synth_") for k, v in steps.items() if k.startswith("synth_") and v.get("skipped_in_training")]


def val_split(split: str) -> str:
    """The validation split that chooses for `split`: 'test' -> 'val', 'test_options' -> 'val_options'."""
    return "val" + split[len("test"):] if split.startswith("test") else split


def best_rounds(rows: Sequence[dict[str, Any]], val: str = "val") -> dict[Any, dict[str, Any]]:
    """Per seed, the ViPER round with the highest `val` average (settings are chosen on val, never on test)."""
    best: dict[Any, dict[str, Any]] = {}
    for r in rows:
        if not r["kind"].startswith("viper round") or not r.get(val) or r[val].get("average") is None:
            continue
        if r["seed"] not in best or r[val]["average"] > best[r["seed"]][val]["average"]:
            best[r["seed"]] = r
    return best


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def group_rows(rows: Sequence[dict[str, Any]], split: str = "test") -> list[dict[str, Any]]:
    """The table's rows: one per kind (best round by val added), each column's mean and std over seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["kind"], []).append(r)
    best = list(best_rounds(rows, val_split(split)).values())
    if best:
        groups["viper best"] = best
    order = ["base", "sft"] + sorted(k for k in groups if k.startswith("viper round")) + \
            ["viper best", "stage1", "stage2", "shuffled"]
    order += [k for k in groups if k not in order]
    table = []
    cats = [c for c in CATEGORIES if any(c in ((r.get(split) or {}).get("categories") or {}) for r in rows)]
    for kind in order:
        members = [r for r in groups.get(kind, []) if r.get(split)]
        if not members:
            continue
        cells = {}
        for c in cats:
            cells[c] = _mean_std([r[split]["categories"].get(c) for r in members])
        cells["average"] = _mean_std([r[split]["average"] for r in members])
        cells["hallucination_rate"] = _mean_std([r[split]["hallucination_rate"] for r in members])
        table.append({"kind": kind, "label": KIND_LABELS.get(kind, kind.replace("viper round", "ViPER round")),
                      "seeds": sorted({r["seed"] for r in members}, key=str), "n": len(members), "cells": cells,
                      "categories": cats})
    return table


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def table_markdown(table: Sequence[dict[str, Any]]) -> str:
    if not table:
        return "(no evaluated model yet)\n"
    cats = table[0]["categories"]
    head = ["model", *cats, "average", "halluc. rate", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        cells = [_cell(*t["cells"][c]) for c in cats] + [_cell(*t["cells"]["average"]),
                                                         _cell(*t["cells"]["hallucination_rate"]), str(t["n"])]
        lines.append("| " + " | ".join([t["label"], *cells]) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ goals

def _paired(rows, kind_a, kind_b, key, split="test"):
    """Per seed: value of kind_a minus kind_b (the base, seed None, pairs with every seed)."""
    def value(r):
        s = r.get(split) or {}
        return s.get("average") if key == "average" else (s.get("hallucination_rate") if key == "hallucination"
                                                           else (s.get("categories") or {}).get(key))

    best = best_rounds(rows, val_split(split))
    by = {}
    for r in rows:
        by.setdefault(r["kind"], {})[r["seed"]] = r
    by["viper best"] = dict(best)
    a, b = by.get(kind_a, {}), by.get(kind_b, {})
    out = {}
    for seed, ra in a.items():
        rb = b.get(seed, b.get(None))
        if rb is not None and value(ra) is not None and value(rb) is not None:
            out[seed] = value(ra) - value(rb)
    return out


def goals(rows: Sequence[dict[str, Any]], split: str = "test") -> list[dict[str, Any]]:
    """The issue's goals, each measured per seed on `split` (best round chosen on val): deltas in points."""
    spec = [("ViPER best - base, fine (>= +5)", "viper best", "base", "fine", lambda d: d >= 0.05),
            ("ViPER best - base, average (>= +2)", "viper best", "base", "average", lambda d: d >= 0.02),
            ("ViPER best - base, hallucination rate (no rise: <= 0)", "viper best", "base", "hallucination",
             lambda d: d <= 0),
            ("ViPER best - SFT control, average (> 0)", "viper best", "sft", "average", lambda d: d > 0),
            ("ViPER best - stage 1 only, average (> 0)", "viper best", "stage1", "average", lambda d: d > 0),
            ("ViPER best - stage 2 only, average (> 0)", "viper best", "stage2", "average", lambda d: d > 0),
            ("shuffled truth - base, average (no gain: <= +1)", "shuffled", "base", "average", lambda d: d <= 0.01)]
    out = []
    for label, a, b, key, ok in spec:
        d = _paired(rows, a, b, key, split)
        out.append({"goal": label, "deltas": {str(k): v for k, v in d.items()},
                    "met_seeds": sum(bool(ok(v)) for v in d.values()), "seeds": len(d)})
    return out


def goals_markdown(items: Sequence[dict[str, Any]]) -> str:
    lines = ["| goal | per seed (points) | met |", "|---|---|---|"]
    for g in items:
        per = ", ".join(f"s{k}: {100 * v:+.1f}" for k, v in g["deltas"].items()) or "not measured"
        lines.append(f"| {g['goal']} | {per} | {g['met_seeds']}/{g['seeds']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots

def plot_curves(runs: dict[str, Sequence[dict[str, Any]]], out: str | Path, title: str = "") -> Path | None:
    """reward/mean (solid) and format_rate (dashed) per per-stage step, one panel per stage, one colour per run."""
    parsed = {label: curves(rows) for label, rows in runs.items()}
    parsed = {k: v for k, v in parsed.items() if v}
    if not parsed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if any(s in c for c in parsed.values())]
    stages += sorted({s for c in parsed.values() for s in c} - set(stages))
    fig, axes = plt.subplots(1, len(stages), figsize=(5.2 * len(stages), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, stage in zip(axes[0], stages):
        for n, (label, c) in enumerate(parsed.items()):
            if stage not in c:
                continue
            colour = colours[n % len(colours)]
            ax.plot(c[stage]["step"], c[stage]["reward"], "-o", ms=3, color=colour, label=f"{label} reward")
            ax.plot(c[stage]["step"], c[stage]["format_rate"], "--", color=colour, alpha=0.7,
                    label=f"{label} format")
        ax.set_title(f"{title} stage {stage}".strip())
        ax.set_xlabel("step in stage")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------ the report

def build_report(workdir: str | Path, specs: Sequence[dict[str, Any]], settings: dict[str, Any] | None = None,
                 bench_tsv: str | Path | None = None, synth_dir: str | Path | None = None,
                 curve_runs: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Writes workdir/results.json and workdir/report.md (+ workdir/report/*.png) from whatever exists now.

    curve_runs: {figure name: {run label: metrics.jsonl path}}, one PNG each."""
    from viper_common.atomic_files import write_json_atomic

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    rows = [r for r in (model_row(s) for s in specs) if r is not None]
    missing = [s["name"] for s in specs if not Path(s["eval"]).exists()]
    figures = []
    for fig, runs in (curve_runs or {}).items():
        path = plot_curves({label: read_jsonl(p) for label, p in runs.items()}, root / "report" / f"{fig}.png",
                           fig.replace("curves_", "").replace("seed", "seed "))
        if path is not None:
            figures.append(path)
    bench, synth = [], []
    best = best_rounds(rows)
    base = next((r for r in rows if r["kind"] == "base"), None)
    if base and best and bench_tsv and Path(bench_tsv).exists():
        first = best[sorted(best, key=str)[0]]
        bench = bench_examples(base["eval"], first["eval"], bench_tsv, root / "report" / "examples")
    if synth_dir and Path(synth_dir).exists():
        synth = synth_examples(synth_dir, root / "report" / "examples")
    goal_items = goals(rows)
    scored = any("test" + OPTIONS_SUFFIX in r for r in rows)
    option_goals = goals(rows, "test" + OPTIONS_SUFFIX) if scored else []
    results = {"settings": settings or {}, "rows": rows, "missing": missing, "goals": goal_items,
               "goals_options_by_likelihood": option_goals,
               "best_rounds_by_val": {str(k): v["name"] for k, v in best.items()}}
    write_json_atomic(root / "results.json", results, indent=1, default=str)
    md = ["# ViPER in ShapeWorld: the experiment of issue 18", "",
          "Accuracy in % on the held-out benchmark, mean ± std over seeds (n = seeds; the base is one model). "
          "'average' is the mean over the categories; 'halluc. rate' is the share of 'yes' to the hallucination "
          "category's absent objects (lower is better). The best ViPER round of each seed is chosen on val.", "",
          "## Test", "", table_markdown(group_rows(rows, "test")), "## Validation", "",
          table_markdown(group_rows(rows, "val")), "## Goals (test, per seed)", "", goals_markdown(goal_items)]
    if scored:
        md += ["## Options by likelihood", "",
               "The same questions, each answered by the option the model finds most likely as its answer "
               "(viper eval --score_options; viper_jax/evaluation/likelihood.py).", "",
               "### Test", "", table_markdown(group_rows(rows, "test" + OPTIONS_SUFFIX)), "### Validation", "",
               table_markdown(group_rows(rows, "val" + OPTIONS_SUFFIX)), "### Goals (test, per seed)", "",
               goals_markdown(option_goals)]
    skipped = [f"{r['name']} (no {', '.join(r['stages_skipped'])})" for r in rows if r.get("stages_skipped")]
    if skipped:
        md += ["**Not ViPER's two stages:** these rounds trained without a stage whose synthesis made no records "
               "(viper loop empty_stage=skip): " + "; ".join(skipped) + ".", ""]
    speed = [(r["name"], r["seconds_per_step"], r["train_steps"]) for r in rows if r.get("seconds_per_step")]
    if speed:
        md += ["## Training speed", "", "| model | s / step | steps |", "|---|---|---|"]
        md += [f"| {n} | {s:.2f} | {k} |" for n, s, k in speed] + [""]
    signal = [(r["name"], r["grpo_signal"]) for r in rows if r.get("grpo_signal")]
    if signal:
        md += ["## GRPO's signal (means over the training steps)", "",
               "| model | reward | format rate | groups with no reward spread | response tokens |", "|---|---|---|---|---|"]
        md += [f"| {n} | {g['reward']:.3f} | {g['format_rate']:.2f} | {g['zero_spread']:.0%} | "
               f"{g['response_tokens']:.1f} |" for n, g in signal] + [""]
        flat = [n for n, g in signal if g["no_signal"]]
        if flat:
            md += ["**No learning signal:** every group had the same reward at every step in " + ", ".join(flat)
                   + ", so every advantage and GRPO's update were zero: the model equals the one it started from.", ""]
    if figures:
        md += ["## Reward (solid) and format rate (dashed) per stage", "",
               "On the training batches (the trainer does not score held-out records).", ""]
        md += [f"![]({p.relative_to(root)})" for p in figures] + [""]
    md += ["## Examples", "", examples_markdown(bench, synth, root)]
    if missing:
        md += ["## Not evaluated (yet)", "", ", ".join(missing), ""]
    if settings:
        md += ["## Settings", "", "```json", json.dumps(settings, indent=1, default=str), "```", ""]
    (root / "report.md").write_text("\n".join(md))
    return results
