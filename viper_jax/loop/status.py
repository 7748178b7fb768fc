"""What `viper loop` has done: a round's status.json (which steps are done, so a rerun resumes) and the state of
the synthesis job shards a step made or waits for (their manifests)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from viper_common.atomic_files import remove_stale_temporaries, write_json_atomic
from viper_common.kill_points import kill_point

STEPS = ("synth_caption_refine", "synth_visual_ops", "train", "export")


class StepFailed(RuntimeError):
    """A step's subprocess failed (or its output is missing); the message names its log."""


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """The loop's JSON files (status.json, REQUEST.json, loop_config.json), written atomically."""
    write_json_atomic(path, payload, indent=1, default=str, end="\n")


class RoundStatus:
    """R/status.json: {"round", "vlm", "state", "steps": {name: {"state", "started", "seconds", "command(s)", ...}}}."""

    def __init__(self, round_dir: Path, index: int, vlm: str):
        self.path = round_dir / "status.json"
        remove_stale_temporaries(round_dir)  # status.json.tmp<pid> of a loop killed before its rename
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"round": index, "steps": {}}
        if self.data.get("vlm") not in (None, vlm):
            raise StepFailed(f"{self.path} was made with synthesiser {self.data['vlm']}, this run would use {vlm}; "
                             f"use a new workdir (or delete {round_dir})")
        self.data.update(vlm=vlm, state=self.data.get("state", "running"))
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)
        kill_point("loop.status_written")  # e.g. a step marked running (or done) and nothing after it yet

    def done(self, step: str) -> bool:
        return self.data["steps"].get(step, {}).get("state") == "done"

    def update(self, step: str, **fields: Any) -> None:
        self.data["steps"].setdefault(step, {}).update(fields)
        self.data["state"] = "done" if all(self.done(name) for name in STEPS) else "running"
        self.save()

    def run(self, step: str, fn: Callable[[], dict[str, Any]], say: Callable[[str], None]) -> None:
        if self.done(step):
            say(f"round {self.data['round']}: {step} already done, skipped")
            return
        start = time.time()
        self.update(step, state="running", started=time.strftime("%Y-%m-%d %H:%M:%S"), error=None)
        say(f"round {self.data['round']}: {step} ...")
        try:
            info = fn()
        except BaseException as e:  # KeyboardInterrupt too: the step shows as interrupted, not running
            state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            self.update(step, state=state, error=str(e)[-2000:], seconds=round(time.time() - start, 1))
            raise
        self.update(step, state="done", seconds=round(time.time() - start, 1), **info)
        say(f"round {self.data['round']}: {step} done in {time.time() - start:.0f} s")


# ------------------------------------------------------------------------------------------------ synthesis shards

_JOB = re.compile(r"^(?P<task>[a-z_]+)-(?P<i>\d+)-of-(?P<n>\d+)$")


def synth_state(out: Path, task: str) -> dict[str, Any]:
    """{"num_shards", "complete" (job shards with a complete manifest), "num_records", "num_rejects"}."""
    jobs = {}
    for d in out.glob(f"{task}-*-of-*"):
        m = _JOB.match(d.name)
        if m and m["task"] == task:
            jobs[(int(m["i"]), int(m["n"]))] = d
    counts = {n for _, n in jobs}
    if len(counts) > 1:
        raise StepFailed(f"{out} holds {task} job shards of different splits {sorted(counts)}: clean it up")
    state = {"num_shards": counts.pop() if counts else 0, "complete": 0, "num_records": 0, "num_rejects": 0}
    for d in jobs.values():
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if manifest.get("complete"):
            state["complete"] += 1
            state["num_records"] += int(manifest.get("num_records", 0))
            state["num_rejects"] += int(manifest.get("num_rejects", 0))
    return state


def synth_finished(out: Path, task: str, expected: int) -> dict[str, Any] | None:
    """synth_state when every job shard (`expected` of them, when not 0) is complete; None before."""
    state = synth_state(out, task)
    shards = state["num_shards"]
    if shards and state["complete"] == shards and (not expected or shards == expected):
        return state
    return None
