"""The world's held-out benchmark as VLMEvalKit-style TSVs that `viper eval` scores unchanged.

One TSV per split (`shapeworld_<split>.tsv`) holds every category, with columns
  index, question, A, B, C, D (empty for yes/no rows), answer, category, image, facet, seed, slot
`image` is one base64 PNG, or for multi_image a Python list string of two (original, edited). The PNGs carry
their scene in metadata (render.read_scene); `viper eval` only decodes the pixels. `seed` and `slot` regenerate
the row exactly: `questions.make_question(category, seed, slot)`, images rendered with the same seed.

Seeds: category c of a split takes consecutive seeds from `splits.seed_block(split, c, SEEDS_PER_CATEGORY)`,
skipping those whose scene admits no question of that category; the k-th accepted question gets slot k, so
answer letters cycle A-D (yes/no alternate) and are balanced exactly.

`manifest.json` next to the TSVs gives, per split and category, counts, facets, answer letters and chance
level (1 / number of options, averaged).
"""

from __future__ import annotations

import base64
import collections
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from viper_common.atomic_files import write_json_atomic
from viper_common.shapeworld import questions, render
from viper_common.shapeworld.splits import seed_block

SEEDS_PER_CATEGORY = 100_000
COLUMNS = ("index", "question", "A", "B", "C", "D", "answer", "category", "image", "facet", "seed", "slot")
MANIFEST_NAME = "manifest.json"
DEFAULT_PER_CATEGORY = {"test": 175, "val": 50}  # test: 6 x 175 = 1,050 questions


def tsv_name(split: str) -> str:
    return f"shapeworld_{split}.tsv"


def generate(split: str, category: str, n: int) -> Iterator[tuple[int, int, questions.Question]]:
    """(seed, slot, question) for the first n questions of a category in a split."""
    block = seed_block(split, questions.CATEGORIES.index(category), SEEDS_PER_CATEGORY)
    slot = 0
    for seed in block:
        if slot == n:
            return
        q = questions.make_question(category, seed, slot)
        if q is not None:
            yield seed, slot, q
            slot += 1
    raise RuntimeError(f"{split}/{category}: only {slot} of {n} questions in {len(block)} seeds")


def row_images(q: questions.Question, seed: int, size: int) -> list[bytes]:
    """PNG bytes of the question's image(s); an edited image is rendered with the original's seed, so only the
    edit differs between the two."""
    return [render.render_png(scene, seed, size) for scene in q.scenes]


def _row(index: int, seed: int, slot: int, q: questions.Question, size: int) -> dict[str, Any]:
    images = [base64.b64encode(b).decode("ascii") for b in row_images(q, seed, size)]
    row = {"index": index, "question": q.question, "answer": q.answer, "category": q.category,
           "image": images[0] if len(images) == 1 else str(images), "facet": q.facet, "seed": seed, "slot": slot}
    row.update({letter: text for letter, text in zip(questions.LETTERS, q.options)})
    return row


def write_benchmark(out_dir: str | os.PathLike, split: str, n_per_category: int | None = None, size: int = 112,
                    categories: tuple[str, ...] = questions.CATEGORIES, log: Any = None) -> Path:
    """Writes `<out_dir>/shapeworld_<split>.tsv` (atomically) and the split's entry in `<out_dir>/manifest.json`;
    returns the TSV path. Progress lines go to `log` (default: sys.stderr at call time)."""
    log = log or sys.stderr
    if split not in DEFAULT_PER_CATEGORY:  # training and synthesis seeds never make benchmark questions
        raise ValueError(f"benchmark split must be one of {sorted(DEFAULT_PER_CATEGORY)}, got {split!r}")
    n = n_per_category if n_per_category is not None else DEFAULT_PER_CATEGORY[split]
    if n < 1:
        raise ValueError(f"n_per_category must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / tsv_name(split)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    facets: dict[str, collections.Counter] = {}
    chance: dict[str, float] = {}
    answers: dict[str, collections.Counter] = {}
    index = 0
    with tmp.open("w", newline="", encoding="utf-8") as f:
        # pandas' to_csv(sep="\t") layout (minimal quoting), which VLMEvalKit and tsv.read_tsv read.
        writer = csv.DictWriter(f, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for category in categories:
            facets[category], answers[category], inverse = collections.Counter(), collections.Counter(), 0.0
            for seed, slot, q in generate(split, category, n):
                writer.writerow(_row(index, seed, slot, q, size))
                index += 1
                facets[category][q.facet] += 1
                answers[category][q.answer] += 1
                inverse += 1 / (len(q.options) or 2)
            chance[category] = inverse / n
            print(f"  {split}: {category} {n} questions", file=log, flush=True)
    os.replace(tmp, path)
    manifest = {"split": split, "tsv": path.name, "image_size": size, "num_questions": index,
                "seeds_per_category": SEEDS_PER_CATEGORY,
                "categories": {c: {"count": n, "chance": round(chance[c], 4), "facets": dict(sorted(facets[c].items())),
                                   "answers": dict(sorted(answers[c].items())),
                                   "seeds": [seed_block(split, questions.CATEGORIES.index(c), SEEDS_PER_CATEGORY).start,
                                             SEEDS_PER_CATEGORY]}
                               for c in categories},
                "chance_overall": round(sum(chance.values()) / len(chance), 4)}
    _update_manifest(out, split, manifest)
    return path


def _update_manifest(out: Path, split: str, entry: dict[str, Any]) -> None:
    """`manifest.json` holds one entry per split written into this folder."""
    path = out / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.exists() else {"splits": {}}
    manifest["splits"][split] = entry
    write_json_atomic(path, manifest, indent=2, sort_keys=True)
