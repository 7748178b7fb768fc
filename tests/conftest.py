"""Shared pytest setup."""

import os

import pytest

# Tests are CPU-only and numerically pinned (fp32 parity against transformers); set before jax loads.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `viper train/sft/generate/eval` turn JAX's persistent compilation cache on by default (compile_cache.py); tests
# (and the commands they run as subprocesses) keep to the caches they set themselves, not the user's folder.
os.environ.setdefault("VIPER_JAX_CACHE_DIR", "off")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two shared cores: oversubscribed torch threads make the tiny models ten times slower. Modules that run
    torch models use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
