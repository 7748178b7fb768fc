"""Files that readers never see half-written: written next to their final name, then renamed into place
(`os.replace` is atomic on POSIX and Windows). Records' manifests, synthesis sidecars, the loop's status
and the evaluation results all go through here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` via a temporary sibling named after this process, then renames it."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_bytes_atomic` of the UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: Any, *, end: str = "", **dumps_kwargs: Any) -> Path:
    """`json.dumps(payload, **dumps_kwargs) + end`, written atomically (each caller keeps its own layout)."""
    return write_text_atomic(path, json.dumps(payload, **dumps_kwargs) + end)
