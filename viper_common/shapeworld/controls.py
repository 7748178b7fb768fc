"""Controls of the ViPER experiment (issue 18) that rewrite synthesised records.

`shuffle_truth`: the shuffled-truth control. Every shard under a synthesis output folder is rewritten with the
`truth` tuples permuted across the records of the same task (ids, images, captions, provenance unchanged), so
that GRPO on the result sees the same prompts, images and answer lengths but a truth that belongs to another
record. If the gain of ViPER comes from its self-synthesised truth, RL on these records must not show it.

The permutation is a derangement within each task: no record keeps its own truth (a record the random
permutation would leave in place is swapped with another). A task with a single record cannot be shuffled; it is
kept and counted (`unshuffled`). Records whose new truth happens to equal their old one in content (two records
with the same sentences) are counted too (`same_content`).

Layout: every folder under `records` that holds `part-*.arrayrecord` shards is mirrored under `out` with the same
relative path and shard names; its manifest.json (when there is one) is copied with the counts of the rewritten
shards and a `shuffled_truth` entry (seed, source). Other files (sidecars) are copied unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from viper_common import records as rec

SHARD_GLOB = f"part-*{rec.SHARD_SUFFIX}"
SUMMARY_NAME = "shuffle_truth.json"


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of range(n) without fixed points (n >= 2); n < 2 gives the identity."""
    perm = rng.permutation(n)
    if n < 2:
        return perm
    fixed = [i for i in range(n) if perm[i] == i]
    if len(fixed) >= 2:  # rotate the fixed points' values among themselves: none stays in place
        values = [perm[i] for i in fixed]
        for k, i in enumerate(fixed):
            perm[i] = values[(k + 1) % len(fixed)]
    elif len(fixed) == 1:  # swap with another position: both move (perm[j] != i since perm[i] == i)
        i = fixed[0]
        j = int(rng.choice([k for k in range(n) if k != i]))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _shard_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob(SHARD_GLOB) if p.is_file()})


def shuffle_truth(records_dir: str | Path, out_dir: str | Path, seed: int) -> dict[str, Any]:
    """Writes the shuffled copy of `records_dir` to `out_dir` (see the module docstring); returns the summary,
    also written to out_dir/shuffle_truth.json (last, so its presence means the copy is complete)."""
    src, out = Path(records_dir).absolute(), Path(out_dir).absolute()
    if not src.is_dir():
        raise FileNotFoundError(f"no records folder {src}")
    if out == src or src in out.parents:
        raise ValueError(f"--out {out} must lie outside --records {src}")
    dirs = _shard_dirs(src)
    if not dirs:
        raise ValueError(f"no {SHARD_GLOB} shards under {src}")
    # Every record, in a fixed order (folder, shard, position), grouped by task.
    shards: dict[Path, list[rec.ViperRecord]] = {}
    by_task: dict[str, list[tuple[Path, int]]] = {}
    for d in dirs:
        for shard in sorted(d.glob(SHARD_GLOB)):
            rows = [rec.decode(raw) for raw in rec.read_shard(shard)]
            shards[shard] = rows
            for k, r in enumerate(rows):
                by_task.setdefault(r.task, []).append((shard, k))
    rng = np.random.default_rng(seed)
    new_truth: dict[tuple[Path, int], tuple[str, ...]] = {}
    summary: dict[str, Any] = {"seed": int(seed), "source": str(src), "tasks": {}}
    for task in sorted(by_task):
        slots = by_task[task]
        perm = derangement(len(slots), rng)
        same = 0
        for i, j in enumerate(perm):
            old = shards[slots[i][0]][slots[i][1]].truth
            new = shards[slots[int(j)][0]][slots[int(j)][1]].truth
            new_truth[slots[i]] = new
            same += int(new == old)
        summary["tasks"][task] = {"records": len(slots), "unshuffled": len(slots) if len(slots) < 2 else 0,
                                  "same_content": same}
    for d in dirs:
        target = out / d.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        counts = {}
        for shard in sorted(d.glob(SHARD_GLOB)):
            rows = [_with_truth(r, new_truth[(shard, k)]) for k, r in enumerate(shards[shard])]
            counts[shard.name] = rec.write_shard(target / shard.name, rows)
        for f in sorted(d.iterdir()):  # sidecars: ids and rejects are unchanged
            if f.is_file() and not f.name.endswith(rec.SHARD_SUFFIX) and f.name != rec.MANIFEST_NAME \
                    and ".tmp" not in f.name:
                shutil.copyfile(f, target / f.name)
        if (d / rec.MANIFEST_NAME).exists():
            manifest = json.loads((d / rec.MANIFEST_NAME).read_text())
            extra = {k: v for k, v in manifest.items() if k not in ("schema_version", "created", "num_records", "shards")}
            extra["shuffled_truth"] = {"seed": int(seed), "source": str(d)}
            rec.write_manifest(target, {**{k: v for k, v in manifest.get("shards", {}).items() if k in counts}, **counts},
                               **extra)
    from viper_common.atomic_files import write_json_atomic

    write_json_atomic(out / SUMMARY_NAME, summary, indent=1)
    return summary


def _with_truth(r: rec.ViperRecord, truth: tuple[str, ...]) -> rec.ViperRecord:
    return rec.ViperRecord(id=r.id, task=r.task, images=r.images, truth=truth, caption=r.caption,
                           provenance=r.provenance, schema_version=r.schema_version, prompt=r.prompt, answer=r.answer)
