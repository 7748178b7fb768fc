"""Tests in this folder need 8 JAX devices. `tests/test_sharding.py` runs them in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (which must be set before JAX starts); in the
ordinary one-device run they are skipped. Shared, session-scoped: the tiny model and its
single-device reference (loss, logits, gradients)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

DEVICES = 8


def pytest_collection_modifyitems(config, items):
    if jax.device_count() == DEVICES:
        return
    skip = pytest.mark.skip(reason=f"needs {DEVICES} devices: run by tests/test_sharding.py in a subprocess")
    for item in items:
        if "multidevice" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    from sharded_tiny import tiny_batch, tiny_config, tiny_params
    cfg = tiny_config()
    graphdef, params = tiny_params(cfg)
    return cfg, graphdef, params, tiny_batch(cfg)


@pytest.fixture(scope="session")
def reference(tiny):
    """Single-device fp32 result on the first device, without any mesh."""
    from sharded_tiny import forward_backward
    _, graphdef, params, batch = tiny
    dev = jax.devices()[0]
    loss, logits, grads = forward_backward(graphdef, jax.device_put(params, dev), jax.device_put(batch, dev))
    return float(loss), np.asarray(logits), jax.device_get(grads)


@pytest.fixture
def compiles():
    """Records XLA compilations while a test runs (to show an error comes before any compile)."""
    events: list[str] = []

    def listener(event: str, duration: float, **_) -> None:
        if "backend_compile" in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
