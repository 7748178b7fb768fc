"""Running `viper loop`'s steps as subprocesses: output appended to the step's log (and echoed), an interrupt
stops the children before it propagates, a failure raises StepFailed naming the command and its log."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from viper_jax.loop.status import StepFailed

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BAR = re.compile(r"\d+%\|")


def run_logged(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None, echo: bool = True,
               prefix: str = "") -> None:
    """Runs `cmd`, appending its output to `log_path` (and echoing lines); raises StepFailed on failure.
    An interrupt terminates the child before it propagates.

    The output is read by a thread while this one waits in short timed waits: a signal the OS hands to another
    thread runs its Python handler only when the main thread next executes, which a read blocked on a quiet
    child would delay until the child's next line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        tail: list[str] = []
        reader = threading.Thread(target=_pump, args=(proc.stdout, log, tail, echo, prefix), daemon=True)
        reader.start()
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            reader.join()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            reader.join(timeout=5)
            raise
    if code != 0:
        raise StepFailed(f"`{shlex.join(cmd)}` exited with status {code}; log: {log_path}\n" + "\n".join(tail))


def _pump(stream: Any, log: Any, tail: list[str], echo: bool, prefix: str) -> None:
    """The child's output lines into `log`, the last 15 shown ones into `tail` (progress bars only when full)."""
    for raw in stream:
        log.write(raw)
        line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\n").split("\r")[-1].rstrip()
        if line and (_BAR.search(line) is None or "100%|" in line):
            tail[:] = (tail + [line])[-15:]
            if echo:
                print(f"{prefix}{line}", flush=True)


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


def command_line(text: str, default_module: str) -> list[str]:
    """A configured command (`synth.command`, `train.command`), or `python -m default_module` of this interpreter."""
    return shlex.split(text) if text else [sys.executable, "-m", default_module]
