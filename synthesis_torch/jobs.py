"""Resumable, sharded synthesis jobs: chunked part shards, per-part sidecars, a manifest per job shard.

Layout of one job shard (one process, e.g. one GPU or one Slurm array task):

    OUT/<task>-<iiiii>-of-<nnnnn>/
        part-00000.arrayrecord   records of chunk 0 (absent if every input of the chunk was rejected)
        part-00000.json          sidecar: input keys processed, record ids, rejects with reasons
        ...
        manifest.json            viper_common.records manifest + counts, rejects by reason, models, settings

Crash safety. A chunk's records are written through `records.ShardWriter` (temporary file, renamed when
complete), then its sidecar is written atomically. The sidecar is the commit point: on start, a part shard
without a sidecar (a kill between the two renames) and any leftover temporary file are deleted, and every
input key listed in a sidecar is skipped. A kill therefore loses at most the chunk in flight, never leaves a
corrupt shard, and a restart produces exactly one outcome (a record or a counted reject) per input.
Only one process may work on a job shard at a time.

The JAX trainer reads `OUT/*/part-*.arrayrecord` (or each job's manifest.json); `viper-synth summary OUT
--write_manifest` writes one `OUT/manifest.json` that names every shard relative to OUT.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from synthesis_torch.inputs import Reject
from viper_common import records
from viper_common.atomic_files import write_json_atomic
from viper_common.kill_points import kill_point

MAX_REJECTS_IN_MANIFEST = 1000  # the full list is in the sidecars


@dataclasses.dataclass
class ChunkResult:
    records: list[records.ViperRecord]
    rejects: list[Reject]
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    keys: dict[str, str] = dataclasses.field(default_factory=dict)  # record id -> input key


def job_dir_name(task: str, shard_index: int, num_shards: int) -> str:
    return f"{task}-{shard_index:05d}-of-{num_shards:05d}"


class Job:
    def __init__(self, out_dir: str | Path, task: str, shard_index: int, num_shards: int):
        if task not in records.TASKS:
            raise ValueError(f"unknown task {task!r}")
        self.task, self.shard_index, self.num_shards = task, shard_index, num_shards
        self.dir = Path(out_dir) / job_dir_name(task, shard_index, num_shards)
        self.dir.mkdir(parents=True, exist_ok=True)

    def recover(self) -> list[str]:
        """Deletes leftovers of a killed run (temporary files, shards without sidecar); returns their names."""
        removed = []
        for path in sorted(self.dir.iterdir()):
            orphan = path.suffix == records.SHARD_SUFFIX and not path.with_suffix(".json").exists()
            if ".tmp" in path.name or orphan:
                path.unlink()
                removed.append(path.name)
        return removed

    def sidecars(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("part-*.json"))]

    def done_keys(self) -> set[str]:
        return {key for part in self.sidecars() for key in part["keys"]}

    def _next_part(self) -> str:
        numbers = [int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.json")]
        return f"part-{max(numbers, default=-1) + 1:05d}"

    def write_part(self, keys: Sequence[str], result: ChunkResult, seconds: float) -> str:
        """Commits one processed chunk. Every key must end as exactly one record or one reject."""
        outcome = [result.keys[r.id] for r in result.records] + [r.key for r in result.rejects]
        if sorted(outcome) != sorted(keys):
            raise RuntimeError(f"chunk accounting broken: inputs {sorted(keys)} vs outcomes {sorted(outcome)}")
        name = self._next_part()
        shard = None
        if result.records:
            shard = name + records.SHARD_SUFFIX
            with records.ShardWriter(self.dir / shard) as writer:
                for rec in result.records:
                    writer.write(rec)
                    kill_point("synth.part.record_written")  # inside the shard: only its temporary file exists
            kill_point("synth.part.shard_committed")  # the shard renamed into place, its sidecar not written
        write_json_atomic(self.dir / f"{name}.json", {
            "part": name, "shard": shard, "num_records": len(result.records), "keys": list(keys),
            "record_ids": [r.id for r in result.records], "rejects": [r.as_dict() for r in result.rejects],
            "dropped": dict(result.dropped), "seconds": round(seconds, 3)},
            indent=1, sort_keys=True, ensure_ascii=False)
        kill_point("synth.part.sidecar_committed")  # the part is done, the job's manifest not updated
        return name

    def write_manifest(self, num_inputs: int, complete: bool, extra: dict[str, Any]) -> Path:
        parts = self.sidecars()
        rejects = [r for p in parts for r in p["rejects"]]
        dropped: collections.Counter = collections.Counter()
        for p in parts:
            dropped.update(p.get("dropped", {}))
        return records.write_manifest(
            self.dir, {p["shard"]: p["num_records"] for p in parts if p["shard"]},
            task=self.task, shard_index=self.shard_index, num_shards=self.num_shards, complete=complete,
            num_inputs=num_inputs, num_processed=sum(len(p["keys"]) for p in parts),
            num_rejects=len(rejects), rejects_by_reason=dict(collections.Counter(r["reason"] for r in rejects)),
            rejects=rejects[:MAX_REJECTS_IN_MANIFEST], dropped_by_reason=dict(dropped),
            seconds=round(sum(p.get("seconds", 0.0) for p in parts), 3), **extra)

    def previous_settings(self) -> Any:
        try:
            return records.read_manifest(self.dir).get("settings")
        except (FileNotFoundError, ValueError):
            return None


def run_job(job: Job, items: Sequence[Any], process_chunk: Callable[[list[Any]], ChunkResult],
            chunk_size: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Processes the inputs of `job` not done yet, chunk by chunk; returns the final manifest."""
    removed = job.recover()
    if removed:
        print(f"[{job.dir.name}] removed leftovers of an interrupted run: {removed}", file=sys.stderr)
    previous = job.previous_settings()
    if previous is not None and previous != extra.get("settings"):
        print(f"[{job.dir.name}] warning: settings differ from the previous run of this job shard; "
              "its existing parts are kept", file=sys.stderr)
    done = job.done_keys()
    todo = [x for x in items if x.key not in done]
    job.write_manifest(len(items), complete=not todo, extra=extra)
    with tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc=job.dir.name,
              dynamic_ncols=True) as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = list(todo[start:start + chunk_size])
            t0 = time.perf_counter()
            result = process_chunk(chunk)
            job.write_part([x.key for x in chunk], result, time.perf_counter() - t0)
            bar.update(len(chunk))
            job.write_manifest(len(items), complete=start + chunk_size >= len(todo), extra=extra)
            kill_point("synth.manifest_written")
    return records.read_manifest(job.dir)
