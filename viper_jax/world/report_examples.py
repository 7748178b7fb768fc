"""The report's examples (viper_jax/world/report.py): benchmark questions whose answer changed between two
models, and synthesised records with their images and truth, saved as PNG strips for report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def _save_images(images: Sequence[bytes], out: Path) -> Path:
    import io

    from PIL import Image

    pics = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    canvas = Image.new("RGB", (sum(p.width for p in pics) + 6 * (len(pics) - 1), max(p.height for p in pics)), "white")
    x = 0
    for p in pics:
        canvas.paste(p, (x, 0))
        x += p.width + 6
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def bench_examples(before_eval: str | Path, after_eval: str | Path, tsv: str | Path, out_dir: str | Path,
                   categories: Sequence[str] = ("multi_image", "fine"), limit: int = 6) -> list[dict[str, Any]]:
    """Test questions whose correctness differs between two models (fixed first, then broken), with their
    images written to out_dir: {index, category, question, options, answer, before, after, image}."""
    from viper_jax.evaluation.tsv import read_tsv
    from viper_jax.world.report import split_name  # report imports this module

    def preds(path):
        files = json.loads(Path(path).read_text())["files"]
        key = next((k for k in files if split_name(k) == "test"), None)
        return {p["index"]: p for p in files[key]["predictions"]} if key else {}

    a, b = preds(before_eval), preds(after_eval)
    changed = [i for i in a if i in b and a[i]["category"] in categories and a[i]["correct"] != b[i]["correct"]]
    changed.sort(key=lambda i: (a[i]["correct"], categories.index(a[i]["category"]), str(i)))
    changed = changed[:limit]
    if not changed:
        return []
    rows = {r.index: r for r in read_tsv(tsv).rows}
    out = []
    for i in changed:
        row = rows.get(i)
        if row is None:
            continue
        image = _save_images(row.images, Path(out_dir) / f"test_{i}.png")
        out.append({"index": i, "category": a[i]["category"], "question": row.question, "options": row.options,
                    "answer": row.answer, "before": a[i]["response"], "after": b[i]["response"],
                    "image": str(image)})
    return out


def synth_examples(synth_dir: str | Path, out_dir: str | Path, per_task: int = 2) -> list[dict[str, Any]]:
    """The first records of each task of a synthesis folder: images written to out_dir, caption and truth."""
    from viper_common.records import TASKS, first_records

    out = []
    for task in TASKS:
        for r in first_records(synth_dir, task, per_task):
            image = _save_images(r.images, Path(out_dir) / f"{task}_{r.id.replace('/', '_')}.png")
            out.append({"task": task, "id": r.id, "caption": r.caption, "truth": list(r.truth), "image": str(image)})
    return out


def _md_text(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def examples_markdown(bench: Sequence[dict[str, Any]], synth: Sequence[dict[str, Any]], root: Path,
                      before: str = "base", after: str = "ViPER") -> str:
    lines = []
    if bench:
        lines += [f"Benchmark questions (test) where {before} and {after} differ:", "",
                  f"| image | category | question | truth | {before} | {after} |", "|---|---|---|---|---|---|"]
        for e in bench:
            q = e["question"] + (" " + " ".join(f"{k}. {v}" for k, v in e["options"].items()) if e["options"] else "")
            rel = Path(e["image"]).relative_to(root) if Path(e["image"]).is_relative_to(root) else e["image"]
            lines.append(f"| ![]({rel}) | {e['category']} | {_md_text(q)} | {e['answer']} | {_md_text(e['before'])} "
                         f"| {_md_text(e['after'])} |")
        lines.append("")
    if synth:
        lines += ["Synthesised training records (round 0, first seed): the VLM's own truth", "",
                  "| image(s) | task | caption | truth |", "|---|---|---|---|"]
        for e in synth:
            rel = Path(e["image"]).relative_to(root) if Path(e["image"]).is_relative_to(root) else e["image"]
            lines.append(f"| ![]({rel}) | {e['task']} | {_md_text(e['caption'] or '')} | "
                         f"{_md_text(' / '.join(e['truth']))} |")
        lines.append("")
    return "\n".join(lines) + "\n" if lines else "(no examples yet)\n"
