"""`viper-synth summary OUT`: what a synthesis run produced, from the job manifests under OUT.

Per task: job shards found and missing, complete or not, inputs / records / rejects, rejects by reason,
dropped model-output pieces by reason, models, time spent, sample ground truths, and for `visual_ops` the
quantiles of the measured edit difference (to calibrate the difference band). With `write_manifest`, one
`OUT/manifest.json` naming every part shard relative to OUT (the trainer can read the whole run from it).
Needs neither torch nor a GPU.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import numpy as np

from viper_common import records

MAX_DIFF_SAMPLES = 500


# The keys summarize reads from a job manifest (jobs.Job.write_manifest writes them all).
JOB_KEYS = ("task", "shard_index", "num_shards", "complete", "num_inputs", "num_records", "shards")


def _job_manifests(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The job manifests of a run folder (or of `root` itself when it is one job shard's folder), each checked
    against its folder: a summary of a damaged manifest would report counts the shards do not hold."""
    if (root / records.MANIFEST_NAME).exists() and "task" in records.read_manifest(root):
        return [(root, _checked(root))]
    unlisted = sorted(p.parent for p in root.glob(f"*/part-*{records.SHARD_SUFFIX}")
                      if not (p.parent / records.MANIFEST_NAME).exists())
    if unlisted:
        raise FileNotFoundError(f"job folder {unlisted[0]} holds record shards but no {records.MANIFEST_NAME}: "
                                f"rerun its viper-synth command (it rewrites the manifest from its parts)")
    return [(p.parent, _checked(p.parent)) for p in sorted(root.glob("*/" + records.MANIFEST_NAME))]


def _checked(job_dir: Path) -> dict[str, Any]:
    """A job manifest whose keys are all there and whose shard counts are those of the files."""
    from array_record.python.array_record_module import ArrayRecordReader

    path = job_dir / records.MANIFEST_NAME
    m = records.read_manifest(job_dir)
    missing = [k for k in JOB_KEYS if k not in m]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; rerun its viper-synth command to rewrite it")
    for name, count in m["shards"].items():
        shard = job_dir / name
        if not shard.is_file():
            raise FileNotFoundError(f"{path} names shard {name}, which does not exist in {job_dir}")
        try:
            reader = ArrayRecordReader(str(shard))
            held = reader.num_records()
            reader.close()
        except RuntimeError as e:  # ArrayRecord's message names no file
            raise ValueError(f"record shard {shard} is damaged ({' '.join(str(e).split())})") from None
        if held != count:
            raise ValueError(f"{path} says shard {name} holds {count} records, the file holds {held}; rerun its "
                             f"viper-synth command to rewrite the manifest")
    return m


def _records(root: Path, shards: list[str], limit: int) -> list[records.ViperRecord]:
    out: list[records.ViperRecord] = []
    for shard in shards:
        for raw in records.read_shard(root / shard):
            out.append(records.decode(raw))
            if len(out) >= limit:
                return out
    return out


def summarize(root: str | Path, samples: int = 3) -> dict[str, Any]:
    root = Path(root)
    tasks: dict[str, dict[str, Any]] = {}
    for job_dir, m in _job_manifests(root):
        t = tasks.setdefault(m["task"], {
            "jobs": [], "num_shards": set(), "num_inputs": 0, "num_processed": 0, "num_records": 0,
            "num_rejects": 0, "rejects_by_reason": collections.Counter(), "dropped_by_reason": collections.Counter(),
            "models": [], "seconds": 0.0, "shards": {}})
        t["jobs"].append({"dir": job_dir.name, "shard_index": m["shard_index"], "complete": m["complete"],
                          "num_inputs": m["num_inputs"], "num_records": m["num_records"]})
        t["num_shards"].add(m["num_shards"])
        for key in ("num_inputs", "num_processed", "num_records", "num_rejects", "seconds"):
            t[key] += m.get(key, 0)
        t["rejects_by_reason"].update(m.get("rejects_by_reason", {}))
        t["dropped_by_reason"].update(m.get("dropped_by_reason", {}))
        if m.get("models") not in t["models"]:
            t["models"].append(m.get("models"))
        rel = job_dir.relative_to(root)
        t["shards"].update({(rel / name).as_posix(): n for name, n in m["shards"].items()})
    for name, t in tasks.items():
        (n,) = t["num_shards"] if len(t["num_shards"]) == 1 else (None,)
        t["num_shards"] = sorted(t["num_shards"])
        t["missing_shards"] = sorted(set(range(n)) - {j["shard_index"] for j in t["jobs"]}) if n else []
        t["complete"] = all(j["complete"] for j in t["jobs"]) and not t["missing_shards"] and n is not None
        shard_names = sorted(t["shards"])
        recs = _records(root, shard_names, max(samples, MAX_DIFF_SAMPLES if name == "visual_ops" else samples))
        t["samples"] = [{"id": r.id, "caption": (r.caption or "")[:200], "truth": list(r.truth)[:5]}
                        for r in recs[:samples]]
        for measure in ("changed_fraction", "mean_abs"):
            values = [r.provenance[measure] for r in recs if measure in r.provenance]
            if values:
                q = np.quantile(np.asarray(values), [0.0, 0.1, 0.5, 0.9, 1.0])
                t.setdefault("edit_difference_quantiles", {})[measure] = {
                    k: round(float(v), 4) for k, v in zip(("min", "p10", "p50", "p90", "max"), q)}
        t["rejects_by_reason"] = dict(t["rejects_by_reason"].most_common())
        t["dropped_by_reason"] = dict(t["dropped_by_reason"].most_common())
    return {"root": str(root), "tasks": tasks}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"synthesis output in {summary['root']}"]
    if not summary["tasks"]:
        lines.append("  no job manifests found (expected <task>-<i>-of-<n>/manifest.json)")
    for name, t in sorted(summary["tasks"].items()):
        state = "complete" if t["complete"] else "INCOMPLETE"
        lines.append(f"\n[{name}] {len(t['jobs'])} job shard(s) of {t['num_shards']} - {state}")
        if t["missing_shards"]:
            lines.append(f"  missing job shards: {t['missing_shards']}")
        unfinished = [j["dir"] for j in t["jobs"] if not j["complete"]]
        if unfinished:
            lines.append(f"  unfinished (rerun the same command to resume): {unfinished}")
        rate = f", {t['seconds'] / max(t['num_processed'], 1):.2f} s/input" if t["num_processed"] else ""
        lines.append(f"  inputs {t['num_inputs']}, processed {t['num_processed']}, records {t['num_records']}, "
                     f"rejects {t['num_rejects']} ({t['seconds']:.0f} s of work{rate})")
        for title, key in (("rejects by reason", "rejects_by_reason"), ("dropped outputs", "dropped_by_reason")):
            if t[key]:
                lines.append(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in t[key].items()))
        for models in t["models"]:
            lines.append(f"  models: {json.dumps(models)}")
        for measure, q in t.get("edit_difference_quantiles", {}).items():
            lines.append(f"  kept edits, {measure} quantiles: {q}")
        for s in t["samples"]:
            lines.append(f"  sample {s['id']}:" + (f" caption: {s['caption']!r}" if s["caption"] else ""))
            lines.extend(f"    - {x}" for x in s["truth"])
    return "\n".join(lines)


def write_combined_manifest(root: str | Path, summary: dict[str, Any]) -> Path:
    """One manifest for the whole run; shard names are relative to `root`."""
    shards = {k: v for t in summary["tasks"].values() for k, v in t["shards"].items()}
    counts = {name: t["num_records"] for name, t in summary["tasks"].items()}
    complete = all(t["complete"] for t in summary["tasks"].values())
    return records.write_manifest(root, shards, records_by_task=counts, complete=complete,
                                  jobs=sorted(j["dir"] for t in summary["tasks"].values() for j in t["jobs"]))
