"""Files that readers never see half-written: written next to their final name, then renamed into place
(`os.replace` is atomic on POSIX and Windows). Records' manifests, synthesis sidecars, the loop's status
and the evaluation results all go through here.

A write that fails (a full disk: ENOSPC) removes its temporary file and raises an OSError naming the final
path, so the old file (if any) stays as it was and a rerun writes it again."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from viper_common.kill_points import kill_point


def write_failed(error: OSError, path: str | os.PathLike) -> OSError:
    """The OSError to raise for a failed write of `path`: same errno, one line naming the final path (not the
    temporary sibling the error came from)."""
    return OSError(error.errno, f"{error.strerror or error}: {Path(path)} was not written (nothing of it kept)")


_TEMPORARY = re.compile(r".+\.tmp(\d+)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Deletes this module's temporary files (`NAME.tmp<pid>`) in `directory` whose writer is gone: what a kill
    between the write and the rename leaves. A live writer's file is kept. Returns the paths removed."""
    removed = []
    for path in Path(directory).glob("*.tmp*") if Path(directory).is_dir() else []:
        m = _TEMPORARY.fullmatch(path.name)
        if m and path.is_file() and (int(m[1]) == os.getpid() or not _alive(int(m[1]))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` via a temporary sibling named after this process, then renames it."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(e, path) from e
    kill_point("atomic.before_rename")  # the complete temporary file is there, the final name not yet
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_bytes_atomic` of the UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: Any, *, end: str = "", **dumps_kwargs: Any) -> Path:
    """`json.dumps(payload, **dumps_kwargs) + end`, written atomically (each caller keeps its own layout)."""
    return write_text_atomic(path, json.dumps(payload, **dumps_kwargs) + end)
