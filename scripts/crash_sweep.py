#!/usr/bin/env python
"""Crash sweep: SIGKILL each command at random moments and at named kill points, resume it, and compare with an
uninterrupted run.

    nice -n 19 .venv/bin/python scripts/crash_sweep.py --trials 5 [--commands train sft ...] [--seed 0]

Per command (tiny offline models and inputs, see scripts/crash_scenarios.py): one uninterrupted reference run,
with VIPER_KILL_LOG listing every kill point it passes (viper_common/kill_points.py); then N trials, each in a
fresh folder: the command is started and SIGKILLed, alternately at a random moment of the reference's duration
and at a kill point drawn from that list (a point, then one of its hits: `name:N`); its whole process group is
then killed too (`viper loop`'s children die with it, as on a preempted VM). The same command line is rerun until
it exits 0 and the result is compared with the reference (parameters, optimizer state, metrics rows, checkpoint
steps, records, shards, sidecars, manifests, export files). Prints `command | K/N identical` and exits 1 on any
mismatch (the first differences of each are printed).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import crash_scenarios as cs  # noqa: E402

RUN_TIMEOUT = 1800  # seconds; a tiny run takes well under a minute (the loop a few), even on two shared cores
MAX_RESUMES = 3


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group (it was started in its own session): the loop's children too."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, env=env, cwd=cs.ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float]:
    t0 = time.time()
    proc = start(cmd, env, log)
    try:
        code = proc.wait(timeout=RUN_TIMEOUT)
    finally:
        _kill_group(proc)
    return code, time.time() - t0


def kill_points_hit(log: Path) -> dict[str, int]:
    """name -> the most hits of it in one process of the reference run (lines are `pid name`)."""
    per_process: collections.Counter = collections.Counter()
    for line in log.read_text().splitlines() if log.exists() else []:
        pid, _, name = line.partition(" ")
        per_process[(pid, name)] += 1
    most: dict[str, int] = {}
    for (_, name), n in per_process.items():
        most[name] = max(most.get(name, 0), n)
    return most


def trial(command: str, root: Path, out: Path, mode: str, rng: random.Random, ref_seconds: float,
          points: dict[str, int]) -> tuple[str, bool, str]:
    """One killed-and-resumed run into `out`: (what was done, whether the kill landed, resume failure or '')."""
    cmd = cs.command_line(root, command, out)
    env, log = cs.env_for(root), out.with_suffix(".log")
    if mode == "point":
        name = rng.choice(sorted(points))
        spec = f"{name}:{rng.randint(1, points[name])}"
        proc = start(cmd, dict(env, VIPER_KILL_AT=spec), log)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT)
        finally:
            _kill_group(proc)
        # The loop itself killed, or one of its children (the loop then stops with the failed step).
        landed, what = code == -signal.SIGKILL or (command == "loop" and code != 0), f"at {spec}"
    else:
        delay = rng.uniform(0.0, ref_seconds)
        proc = start(cmd, env, log)
        try:
            proc.wait(timeout=delay)
            landed = False
        except subprocess.TimeoutExpired:
            landed = True
        _kill_group(proc)
        proc.wait()
        what = f"after {delay:.1f} s"
    for _ in range(MAX_RESUMES):
        code, _ = run_to_end(cmd, env, log)
        if code == 0:
            return what, landed, ""
    return what, landed, f"the resumed run failed {MAX_RESUMES} times (exit {code}); log {log}"


def sweep(command: str, root: Path, trials: int, rng: random.Random) -> tuple[int, int, int, list[str]]:
    """(identical, trials, kills that landed, reports of the trials that differ)."""
    cs.prepare(root, command)
    work = root / "runs" / command
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ref, hits = work / "reference", work / "reference.kill_log"
    code, seconds = run_to_end(cs.command_line(root, command, ref), dict(cs.env_for(root), VIPER_KILL_LOG=str(hits)),
                               ref.with_suffix(".log"))
    if code != 0:
        raise SystemExit(f"{command}: the reference run failed (exit {code}); log {ref.with_suffix('.log')}")
    want = cs.digest(command, ref)
    points = kill_points_hit(hits)
    print(f"{cs.LABELS[command]}: reference {seconds:.0f} s; kill points passed: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(points.items())), flush=True)
    same, landed_total, reports = 0, 0, []
    for i in range(trials):
        out = work / f"trial_{i:03d}"
        mode = "point" if i % 2 == 0 and points else "moment"
        what, landed, failure = trial(command, root, out, mode, rng, seconds, points)
        landed_total += landed
        diffs = [failure] if failure else cs.differences(want, cs.digest(command, out))
        ok = not diffs
        same += ok
        note = "" if landed else " (finished before the kill)"
        print(f"  trial {i}: killed {what}{note}: {'identical' if ok else 'DIFFERS'}", flush=True)
        if not ok:
            reports.append(f"{cs.LABELS[command]} trial {i} (killed {what}):\n    " + "\n    ".join(diffs))
        else:
            shutil.rmtree(out, ignore_errors=True)  # keep the disk small; failing trials stay for inspection
    return same, trials, landed_total, reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--commands", nargs="+", default=list(cs.COMMANDS), choices=list(cs.COMMANDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for inputs and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="viper_crash_sweep_"))
    rng = random.Random(args.seed)
    rows, reports = [], []
    for command in args.commands:
        same, n, landed, bad = sweep(command, root, args.trials, rng)
        rows.append((cs.LABELS[command], same, n, landed))
        reports += bad
    print("\n| command | identical | kills that landed |\n|---|---|---|")
    for label, same, n, landed in rows:
        print(f"| {label} | {same}/{n} identical | {landed}/{n} |")
    for report in reports:
        print(report)
    print(f"work folder: {root}")
    return 1 if reports else 0


if __name__ == "__main__":
    raise SystemExit(main())
