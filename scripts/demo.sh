#!/usr/bin/env bash
# The project's main job on a fresh machine, CPU only, no downloads: installs .[demo] into .venv if
# needed, then `viper demo` runs one full ViPER round in ShapeWorld on the shipped base (assets/world_base:
# synthesise -> train stage 1 and 2 -> export -> evaluate before / after) and writes demo_run/report.md;
# `--photos` runs the round with tiny random-init models on real photographs instead.
# Extra arguments go to `viper demo`, e.g. `bash scripts/demo.sh --workdir /tmp/viper_demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[demo]"
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/viper demo "$@"
