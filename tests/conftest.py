"""Shared pytest setup."""

import os

# Tests are CPU-only and numerically pinned (fp32 parity against transformers); set before jax loads.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
