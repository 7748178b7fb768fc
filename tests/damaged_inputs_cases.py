"""The damaged inputs of tests/test_damaged_inputs.py: each case damages one file the project reads, runs it
through the reader or command that reads it, and returns what happened as an Outcome (verdict, message).

Verdicts: "error" (a one-line user error: the CLIs print it and exit 1), "skip" (the input is dropped and
counted by reason where the design counts skips), "used" (the input is fine after all; the case checks what
was read is right), and the two failures the test refuses: "traceback" (an exception a user would see as a
traceback) and "wrong" (a silent wrong answer)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from viper_common.cli_errors import is_user_error, one_line, run_console

Outcome = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str    # the file kind (first column of the doc's table)
    damage: str  # what was done to it
    expect: str  # the verdict the project must give
    run: Callable[[Any, Path], tuple[Outcome, list[str]]]  # (Shared, tmp folder) -> (outcome, what it must name)


CASES: list[Case] = []


def case(kind: str, damage: str, expect: str = "error") -> Callable:
    def register(fn: Callable[[Any, Path], tuple[Outcome, list[str]]]) -> Callable:
        CASES.append(Case(kind, damage, expect, fn))
        return fn
    return register


# ------------------------------------------------------------------------------------------ how to observe

def call(fn: Callable[[], Any]) -> Outcome:
    """fn() as a CLI would report it: a user error is its one line; any other exception a traceback."""
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - classifying every failure is the point
        if is_user_error(e):
            return "error", one_line(e)
        return "traceback", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
    return "used", repr(value)[:200]


def cli(prog: str, main: Callable[[list[str]], Any], argv: list[str]) -> Outcome:
    """The console entry point in-process (run_console is the code the installed command runs)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = run_console(prog, main, argv)
        except SystemExit as e:  # a sub-command's own `raise SystemExit("message")`: Python prints it, exit 1
            if isinstance(e.code, str):
                return ("error" if "\n" not in e.code else "traceback"), e.code
            rc = int(e.code or 0)
        except Exception as e:  # noqa: BLE001 - run_console re-raised it: the user sees a traceback
            return "traceback", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
    lines = [line for line in err.getvalue().splitlines() if line.strip() and not line.startswith(("WARNING", "I0"))]
    ours = [line for line in lines if line.startswith(f"{prog}: ")]
    if rc == 1 and len(ours) == 1:
        return "error", ours[0].removesuffix(" (--debug shows the traceback)")
    return ("used" if rc == 0 else "traceback"), f"exit {rc}: " + " / ".join(lines)[-400:]


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def warnings_of(name: str):
    """The warning messages logger `name` (and its children) emits inside the block."""
    handler, logger = _Warnings(), logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------------------------------ file makers

def png(size: tuple[int, int] = (160, 160), mode: str = "RGB", colour: Any = (200, 30, 30), **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG header claiming 900 M pixels (PIL refuses > 2 x MAX_IMAGE_PIXELS when opening): a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def safetensors_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    data = path.read_bytes()
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_safetensors(path: Path, header: dict[str, Any], body: bytes) -> None:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)


def tsv(rows: list[dict[str, str]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return "\t".join(cols) + "\n" + "".join("\t".join(r.get(c, "") for c in cols) + "\n" for r in rows)


def tsv_row(index: str = "1", image: bytes | None = None, **cells: str) -> dict[str, str]:
    row = {"index": index, "question": "What colour is it?", "A": "red", "B": "blue", "answer": "A",
           "image": base64.b64encode(png((32, 32)) if image is None else image).decode()}
    row.update(cells)
    return row


@dataclasses.dataclass(frozen=True)
class Shared:
    """Built once per test run: the good files each case copies and damages."""
    model: Path     # a tiny HF model directory (config.json, model.safetensors, tokenizer)
    ckpt: Path      # its Orbax conversion, steps 1 and 2
    records: Path   # tiny synthesis output: <task>-00000-of-00001/part-00000.arrayrecord per task


def copy_model(shared: Shared, tmp: Path) -> Path:
    import shutil

    return Path(shutil.copytree(shared.model, tmp / "model"))


def convert_hf(model: Path, tmp: Path) -> Outcome:
    from viper_jax.cli import main

    return cli("viper", main, ["convert", "hf-to-orbax", "--hf_dir", str(model), "--out", str(tmp / "orbax")])


def console(module: str, argv: list[str], tmp: Path) -> Outcome:
    """`python -m module argv` as a subprocess: the installed console path, for the few cases that show it
    (tests/test_cli_errors.py's runner and its one-line check)."""
    from grpo_tiny import subprocess_env
    from test_cli_errors import _run

    done = _run(module, argv, subprocess_env(tmp / "data", tmp / "jax_cache"))
    prog = "viper" if module == "viper_jax" else "viper-synth"
    ours = [line for line in done.stderr.splitlines() if line.startswith(f"{prog}: ")]
    if done.returncode == 1 and len(ours) == 1 and "Traceback" not in done.stderr:
        return "error", ours[0].removesuffix(" (--debug shows the traceback)")
    return "traceback", f"exit {done.returncode}: {done.stderr[-400:]}"


def convert_orbax(ckpt: Path, tmp: Path, *extra: str) -> Outcome:
    from viper_jax.cli import main

    return cli("viper", main, ["convert", "orbax-to-hf", "--ckpt", str(ckpt), "--out", str(tmp / "hf"), *extra])
