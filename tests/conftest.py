"""Shared pytest setup."""

import os

import pytest

# Tests are CPU-only and numerically pinned (fp32 parity against transformers); set before jax loads.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two shared cores: oversubscribed torch threads make the tiny models ten times slower. Modules that run
    torch models use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
