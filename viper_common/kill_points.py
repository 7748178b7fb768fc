"""Named kill points: places where a crash hurts most (inside a checkpoint save, between a checkpoint and its
metrics row, between a part shard and its sidecar, between the files of an HF export, around the loop's status
writes), where a test or `scripts/crash_sweep.py` can SIGKILL the process at exactly that moment.

    VIPER_KILL_AT=name        SIGKILL on the first hit of kill point `name`
    VIPER_KILL_AT=name:N      ... on its N-th hit (1-based)
    VIPER_KILL_LOG=FILE       append `pid name` to FILE for every hit: the crash sweep's list of the points an
                              uninterrupted run passes (per process: hits are counted per process), from which
                              it draws `name:N`

Both are read once, at import: with neither set, `kill_point` is one global check and a return (the points sit
on per-step paths). SIGKILL, not an exception: nothing of the process runs afterwards (no `finally`, no
atexit, no flush of Python-side buffers), which is what a preempted VM or an OOM kill leaves.

Imports neither JAX nor torch (both halves of the project use it).
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "VIPER_KILL_AT"
KILL_LOG_ENV = "VIPER_KILL_LOG"


def _parse(spec: str) -> tuple[str, int] | None:
    spec = spec.strip()
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    try:
        count = int(nth) if nth else 1
    except ValueError:
        raise ValueError(f"{KILL_AT_ENV}={spec!r}: expected NAME or NAME:N with N a whole number") from None
    if count < 1:
        raise ValueError(f"{KILL_AT_ENV}={spec!r}: N counts hits from 1")
    return name, count


_TARGET = _parse(os.environ.get(KILL_AT_ENV, ""))
_LOG = os.environ.get(KILL_LOG_ENV) or None
ACTIVE = _TARGET is not None or _LOG is not None  # read by callers that must prepare a point (see armed)
_hits: dict[str, int] = {}


def armed(name: str) -> bool:
    """Whether a hit of `name` may kill this process now: callers that have to set the moment up (flush half a
    line, wait for an asynchronous commit) do so only then, so an unset VIPER_KILL_AT changes nothing."""
    return _TARGET is not None and _TARGET[0] == name and _hits.get(name, 0) + 1 == _TARGET[1]


def kill_point(name: str) -> None:
    """Counts a hit of kill point `name`; SIGKILLs this process when VIPER_KILL_AT names this hit."""
    if not ACTIVE:
        return
    count = _hits[name] = _hits.get(name, 0) + 1
    if _LOG is not None:
        # O_APPEND: lines of several processes of one run (the loop and its children) never interleave.
        fd = os.open(_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {name}\n".encode())
        finally:
            os.close(fd)
    if _TARGET is not None and _TARGET == (name, count):
        os.kill(os.getpid(), signal.SIGKILL)
