"""Stand-ins for `viper-synth` and `viper` (train, convert) as `viper loop` calls them, for the loop's own kill
points in tests/test_kill_points.py (a real round takes minutes here; scripts/crash_sweep.py runs real ones).
Each writes what the loop checks (complete job manifests, a metrics row, an export folder) and appends its
command to $FAKE_STEPS_LOG, so a test can count what was (re)run. Not a test module."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def main(argv: list[str]) -> None:
    with open(os.environ["FAKE_STEPS_LOG"], "a") as log:
        log.write(argv[0] + "\n")
    if argv[0] in ("caption-refine", "visual-ops"):
        task = argv[0].replace("-", "_")
        job = Path(_arg(argv, "--out")) / f"{task}-00000-of-00001"
        job.mkdir(parents=True, exist_ok=True)
        (job / "manifest.json").write_text(json.dumps({"complete": True, "num_records": 2, "num_rejects": 0}))
    elif argv[0] == "train":
        workdir = Path(_arg(argv, "--workdir"))
        (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "stage": "caption_refine"}) + "\n")
    elif argv[0] == "convert":
        out = Path(_arg(argv, "--out"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"from": Path(_arg(argv, "--ckpt")).name}))
    else:
        raise SystemExit(f"fake_loop_steps: unexpected command {argv}")


if __name__ == "__main__":
    main(sys.argv[1:])
