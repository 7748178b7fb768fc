"""Per-step metrics to the console, `metrics.jsonl` and TensorBoard event files, plus the progress bar.

Only the main process writes (the caller passes enabled=False elsewhere). On resume from step k the
JSONL file is cut back to steps <= k (rewritten atomically) and TensorBoard purges later events
(`purge_step`), so after a kill and restart each step appears exactly once, with the values of the run that
finished it. A kill during a write can leave the file's last line half-written: `read_metrics` (every
reader of a metrics.jsonl) and the resume drop it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from viper_common import kill_points
from viper_common.atomic_files import remove_stale_temporaries, write_text_atomic

logger = logging.getLogger(__name__)

# Shown on the console line (the rest goes to JSONL / TensorBoard only).
CONSOLE_KEYS = ("reward/mean", "reward/std", "format_rate", "response_length/mean", "update/grad_norm",
                "update/clip_frac_high", "update/entropy", "time/step_s")


def _scalar(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of every line of a JSONL file, skipping blank lines. A last line that does not parse
    (cut short by a kill mid-write) is dropped with a warning; a bad line before it is an error naming it."""
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as e:
            if number == len(lines):
                logger.warning("%s: its last line is cut short (a run killed while writing it) and is dropped: %r",
                               path, line[:200])
                break
            raise ValueError(f"{path}, line {number}: not a JSON object ({e}): {line[:200]!r}") from None
        out.append((line, row))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl`, without a half-written last line (see `_rows`)."""
    return [row for _, row in _rows(Path(path))]


class MetricsLogger:
    def __init__(self, workdir: str | Path, *, start_step: int, total_steps: int, enabled: bool = True,
                 tensorboard: bool = True, progress_bar: bool = True, console_every: int = 1,
                 desc: str = "grpo", console_keys: Sequence[str] = CONSOLE_KEYS, bar_key: str = "reward/mean"):
        """desc names the progress bar; console_keys are shown on the console line, bar_key beside the bar."""
        self.enabled = enabled
        self.console_keys, self.bar_key = tuple(console_keys), bar_key
        self.console_every = max(int(console_every), 1)
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "metrics.jsonl"
        remove_stale_temporaries(workdir)  # metrics.jsonl / config.json temporaries of a run killed mid-rename
        if path.exists():  # drop steps the checkpoint does not cover (they will be redone), and a cut last line
            kept = [line for line, row in _rows(path) if row.get("step", 0) <= start_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not progress_bar)

    def write(self, step: int, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """`metrics`: scalars (all sinks); `extra`: JSON-only values such as the step's record ids."""
        if not self.enabled:
            return
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        line = json.dumps({"step": step, **scalars, **(extra or {})}) + "\n"
        if kill_points.armed("metrics.half_line"):  # what a kill inside the write leaves: half a line on disk
            self.jsonl.write(line[:len(line) // 2])
            self.jsonl.flush()
        kill_points.kill_point("metrics.half_line")  # counts every write, so NAME:N reaches any step's row
        self.jsonl.write(line)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({self.bar_key.split("/")[-1]: f"{scalars.get(self.bar_key, float('nan')):.3f}"},
                                 refresh=False)
            if step % self.console_every == 0:
                shown = " ".join(f"{k.split('/')[-1] if k.startswith('update/') else k}={scalars[k]:.4g}"
                                 for k in self.console_keys if k in scalars)
                stage = (extra or {}).get("stage", "")
                self.bar.write(f"step {step}{f' [{stage}]' if stage else ''} {shown}")

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
