"""keep_freed_host_memory: XLA:CPU's per-call temporaries stop page-faulting once glibc keeps freed
memory. Each case runs in a fresh process, because malloc options are process-wide and must be set
before JAX starts its CPU client."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp
from viper_jax.host_memory import keep_freed_host_memory

if sys.argv[1] == "late":
    jnp.ones(3).block_until_ready()  # JAX's CPU client starts first
applied = keep_freed_host_memory() if sys.argv[1] in ("keep", "late") else None

@jax.jit
def step(x):  # a and b are 80 MB of temporaries: 20k pages of 4 KiB
    a = jnp.sin(x @ x.T)
    b = jnp.cos(a @ x)
    return a.sum() + b.sum() + jnp.tanh(x.T @ b).sum()

x = jnp.full((4096, 1024), 0.01)
faults = []
for _ in range(10):
    time.sleep(0.05)  # as between training steps: the last call's buffers are freed by now
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""
TEMP_PAGES = (4096 * 4096 + 4096 * 1024) * 4 // 4096


def _probe(mode: str) -> dict:
    env = {"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "")}  # no inherited malloc settings
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300,
                         env=env, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc options")


@glibc_only
def test_keep_freed_host_memory_stops_per_call_page_faults():
    keep, default = _probe("keep"), _probe("default")
    assert keep["applied"] is True
    # A call that faults in at least half the block got fresh memory. With glibc's defaults that is
    # every call. Kept, the heap only grows until it holds the calls' peak: a warm-up call or two (probably
    # a freed block that small allocations split no longer fits), then none.
    fresh = lambda run: sum(f > TEMP_PAGES // 2 for f in run["faults"][1:])
    assert fresh(keep) <= 3, (keep, TEMP_PAGES)
    if not _thp_always():  # with huge pages everywhere the default costs ~50 faults a call, not 20k
        assert fresh(default) >= 8, (default, TEMP_PAGES)


@glibc_only
def test_keep_freed_host_memory_refuses_once_jax_runs():
    """Called after the first computation it could not help (XLA's threads hold their own arenas),
    so it says so instead of reporting success."""
    assert _probe("late")["applied"] is False
