"""The ViPER experiment of issue 18 in ShapeWorld, end to end: base, benchmark, R rounds of `viper loop` per seed,
the controls (SFT on the same data, stage 1 only, stage 2 only, shuffled truth), `viper eval` of every model,
results.json and report.md. Each step is a subprocess and is skipped when its output exists (resume after a kill).

    python scripts/reproduce.py --workdir runs/reproduce [--quick] [--seeds 0,1,2] [--rounds R]
    python scripts/reproduce.py --dry_run          # the exact command lines, and which are done
    python scripts/reproduce.py --report_only      # rewrite results.json / report.md from what exists

The steps and their outputs: viper_jax/world/reproduce.py; the aggregation: viper_jax/world/report.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from viper_jax.world.reproduce_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
