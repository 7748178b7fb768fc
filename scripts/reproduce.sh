#!/usr/bin/env bash
# The ViPER experiment of issue 18 in ShapeWorld (scripts/reproduce.py), CPU only, no downloads: installs .[demo]
# into .venv if needed, then runs every step not done yet and writes WORKDIR/results.json and WORKDIR/report.md.
# Arguments go to scripts/reproduce.py, e.g. `bash scripts/reproduce.sh --quick` (<= 10 min once the base exists)
# or `bash scripts/reproduce.sh --workdir runs/reproduce --seeds 0,1,2 --rounds 2`; `--dry_run` prints the commands.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import viper_jax, synthesis_torch, matplotlib" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[demo]"
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/reproduce.py "$@"
