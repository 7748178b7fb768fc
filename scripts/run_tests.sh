#!/usr/bin/env bash
# The one command that runs the test suite on a fresh machine: makes .venv if needed, installs the
# project with its `test` extra (JAX, Flax, transformers, diffusers, torch 2.14.1 + torchvision 0.29.1
# for the PyTorch references and the Qwen-Image-Edit pipeline), then runs pytest on the CPU.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --no-cache-dir --upgrade pip
.venv/bin/python -m pip install --quiet --no-cache-dir -e ".[test]"
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -n 2 --dist loadfile tests "$@"
