"""Shared setup for the GRPO trainer tests (not a test module): tiny records, the tiny config with
test-sized settings, a persistent JAX compilation cache, the `viper train` subprocess command, and the
kill-and-compare pieces of the resume tests (also `viper sft`'s)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.py"

# One set of shapes for every test, so compiled programs are shared through the persistent cache:
# 4 prompts x 4 samples, 16 new tokens, 2 minibatches, 56x56 images (4 merged tokens each).
TEST_OVERRIDES = ("--config.rl.prompts_per_step=4", "--config.rl.group_size=4", "--config.rl.num_minibatches=2",
                  "--config.rollout.max_new_tokens=16", "--config.logging.progress_bar=false")


def tiny_config(workdir: Path, data_dir: Path, overrides: Sequence[str] = ()):
    from viper_jax.train.config import apply_overrides, load_config

    old = os.environ.get("VIPER_TINY_DATA")
    os.environ["VIPER_TINY_DATA"] = str(data_dir)
    try:
        config = load_config(TINY_CONFIG)
    finally:
        if old is None:
            os.environ.pop("VIPER_TINY_DATA")
        else:
            os.environ["VIPER_TINY_DATA"] = old
    apply_overrides(config, [*TEST_OVERRIDES, *overrides])
    config.workdir = str(workdir)
    return config


def subprocess_env(data_dir: Path, cache_dir: Path, fast_compile: bool = True) -> dict[str, str]:
    """Environment of a `viper train` subprocess. fast_compile: XLA's backend optimisation level 0
    compiles about 2.5x faster on this CPU; runs that are compared with each other all use it."""
    env = dict(os.environ, VIPER_TINY_DATA=str(data_dir), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONPATH=str(ROOT))
    if fast_compile:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return env


def train_command(workdir: Path, overrides: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "viper_jax", "train", "--config", str(TINY_CONFIG), "--workdir", str(workdir),
            *TEST_OVERRIDES, *overrides]


@contextlib.contextmanager
def compilation_cache(directory: Path) -> Iterator[None]:
    """Turns the persistent compilation cache on for this process (trainer runs in one test module
    then share compiled programs), and restores the previous setting afterwards."""
    from jax._src import compilation_cache as cc  # reset_cache: jax decides once whether the cache is used

    old_dir = jax.config.jax_compilation_cache_dir
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    cc.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", old_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
        cc.reset_cache()


def committed(workdir: Path, step: int) -> bool:
    """Whether checkpoint `step` of a trainer workdir is complete (Orbax writes this file last)."""
    return (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists()


def kill_after_checkpoint(command: Sequence[str], env: dict[str, str], workdir: Path, step: int,
                          timeout: float = 300) -> None:
    """Runs `command` and SIGKILLs it as soon as checkpoint `step` is committed, asserting that it was
    still running then (so the kill lands mid-run, with later steps not yet checkpointed)."""
    proc = subprocess.Popen(list(command), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not committed(workdir, step):
            assert proc.poll() is None, f"the run ended before writing checkpoint {step}"
            assert time.time() < deadline, f"no checkpoint {step} within {timeout} s"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def raw_checkpoint(workdir: Path, step: int, json_items: Sequence[str] = ("train_meta",)) -> dict:
    """params, opt_state (NumPy leaves, as saved) and the named JSON items of a trainer checkpoint."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    args = {"params": ocp.args.StandardRestore(), "opt_state": ocp.args.StandardRestore(),
            **{k: ocp.args.JsonRestore() for k in json_items}}
    with ocp.CheckpointManager(workdir / "checkpoints", options=options) as m:
        items = m.restore(step, args=ocp.args.Composite(**args))
        return {k: jax.tree.map(np.asarray, items[k]) for k in args}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """params and opt_state of two raw checkpoints: the same leaves, dtypes, shapes and bytes."""
    for name in ("params", "opt_state"):
        leaves_a, leaves_b = jax.tree.leaves(a[name]), jax.tree.leaves(b[name])
        assert len(leaves_a) == len(leaves_b) > 0
        for x, y in zip(leaves_a, leaves_b):
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
