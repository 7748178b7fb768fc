"""`viper sft` throughput on the tiny config: tokens/s (all real tokens, and answer tokens) per step.

    python scripts/bench_sft.py [--steps 60] [--mixed] [--config.a.b=value ...]

Runs configs/sft_tiny.py in a temporary workdir on tiny instruct records (one image each: one batch
shape), or with --mixed on caption_refine + visual_ops + instruct records (1- and 2-image rows: several
shapes, each compiled once). Steps that compiled are left out: a step slower than 3x the median is
counted as compile. Prints the median step and the steady throughput (tokens / seconds over the rest).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str]) -> None:
    from viper_jax.sft.config import apply_overrides, load_config
    from viper_jax.sft.trainer import train
    from viper_jax.tiny import write_tiny_instruct_records, write_tiny_records

    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 60
    mixed = "--mixed" in argv
    overrides = [a for a in argv if a.startswith("--config.")]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_tiny_instruct_records(data, count=32, two_images=mixed)
        if mixed:
            write_tiny_records(data, per_task=16)
        config = load_config(ROOT / "configs" / "sft_tiny.py")
        apply_overrides(config, [f"--config.steps={steps}", f"--config.checkpoint.every_steps={steps}",
                                 f"--config.data.shard_globs={data}/*/part-*.arrayrecord",
                                 "--config.logging.progress_bar=false", "--config.logging.tensorboard=false",
                                 *overrides])
        config.workdir = str(Path(tmp) / "run")
        train(config)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = np.asarray([r["seconds"] for r in rows])
    steady = seconds < 3 * np.median(seconds)
    tokens = np.asarray([r["tokens"] for r in rows])
    answer = np.asarray([r["answer_tokens"] for r in rows])
    print(f"viper sft, configs/sft_tiny.py ({'mixed records' if mixed else 'instruct records, one shape'}), "
          f"batch {config.data.batch_size}, {steps} steps, {int((~steady).sum())} compiling step(s) left out")
    print(f"  median step {np.median(seconds) * 1e3:.1f} ms, {np.median(tokens):.0f} tokens "
          f"({np.median(answer):.0f} answer tokens)")
    print(f"  steady: {tokens[steady].sum() / seconds[steady].sum():,.0f} tokens/s, "
          f"{answer[steady].sum() / seconds[steady].sum():,.0f} answer tokens/s")
    print(f"  whole run incl. compiles: {tokens.sum() / seconds.sum():,.0f} tokens/s")


if __name__ == "__main__":
    main(sys.argv[1:])
