"""The machinery under `viper loop`'s steps: a round's status.json (what is done, resumable), running a step's
subprocesses into logs (interrupts stop the children), and reading synthesis job shards' manifests."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

STEPS = ("synth_caption_refine", "synth_visual_ops", "train", "export")


class StepFailed(RuntimeError):
    """A step's subprocess failed (or its output is missing); the message names its log."""



# ------------------------------------------------------------------------------------------------ status

def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class RoundStatus:
    """R/status.json: {"round", "vlm", "state", "steps": {name: {"state", "started", "seconds", "command(s)", ...}}}."""

    def __init__(self, round_dir: Path, index: int, vlm: str):
        self.path = round_dir / "status.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"round": index, "steps": {}}
        if self.data.get("vlm") not in (None, vlm):
            raise StepFailed(f"{self.path} was made with synthesiser {self.data['vlm']}, this run would use {vlm}; "
                             f"use a new workdir (or delete {round_dir})")
        self.data.update(vlm=vlm, state=self.data.get("state", "running"))
        self.save()

    def save(self) -> None:
        _write_json(self.path, self.data)

    def done(self, step: str) -> bool:
        return self.data["steps"].get(step, {}).get("state") == "done"

    def update(self, step: str, **fields: Any) -> None:
        self.data["steps"].setdefault(step, {}).update(fields)
        self.data["state"] = "done" if all(self.done(s) for s in STEPS) else "running"
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


# ------------------------------------------------------------------------------------------------ processes

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BAR = re.compile(r"\d+%\|")


def run_logged(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None, echo: bool = True,
               prefix: str = "") -> None:
    """Runs `cmd`, appending its output to `log_path` (and echoing lines); raises StepFailed on failure.
    An interrupt terminates the child before it propagates."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        tail: list[str] = []
        try:
            for raw in proc.stdout:  # type: ignore[union-attr]
                log.write(raw)
                line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\n").split("\r")[-1].rstrip()
                if line and (_BAR.search(line) is None or "100%|" in line):  # progress bars: only when full
                    tail = (tail + [line])[-15:]
                    if echo:
                        print(f"{prefix}{line}", flush=True)
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code != 0:
        raise StepFailed(f"`{shlex.join(cmd)}` exited with status {code}; log: {log_path}\n" + "\n".join(tail))


def run_parallel(commands: Sequence[Sequence[str]], logs: Sequence[Path], envs: Sequence[dict[str, str]]) -> None:
    """Runs the commands at once, each into its own log; an interrupt terminates all of them."""
    procs, files = [], []
    try:
        for cmd, log, env in zip(commands, logs, envs):
            log.parent.mkdir(parents=True, exist_ok=True)
            files.append(open(log, "ab"))
            files[-1].write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n".encode())
            files[-1].flush()
            procs.append(subprocess.Popen(list(cmd), stdout=files[-1], stderr=subprocess.STDOUT, env=env))
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for f in files:
            f.close()
    failed = [f"`{shlex.join(c)}` exited with status {code}; log: {log}"
              for c, code, log in zip(commands, codes, logs) if code != 0]
    if failed:
        raise StepFailed("\n".join(failed))


def _command(text: str, default_module: str) -> list[str]:
    return shlex.split(text) if text else [sys.executable, "-m", default_module]


# ------------------------------------------------------------------------------------------------ synthesis

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


def _synth_finished(out: Path, task: str, expected: int) -> dict[str, Any] | None:
    st = synth_state(out, task)
    if st["num_shards"] and st["complete"] == st["num_shards"] and (not expected or st["num_shards"] == expected):
        return st
    return None
