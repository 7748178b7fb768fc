"""The persistent compilation cache of `viper sft` (and train/generate/eval): where it goes, and that a second
tiny run loads the programs the first one wrote (its first step, compiles included, is then much shorter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from grpo_tiny import ROOT

from viper_jax import compile_cache
from viper_jax.tiny import write_tiny_instruct_records

CONFIG = ROOT / "configs" / "sft_tiny.py"


def test_cache_dir_precedence(monkeypatch, tmp_path):
    for name in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "viper_jax" / "jax_cache"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.cache_dir() == tmp_path / "jax"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.cache_dir() == tmp_path / "env"
    assert compile_cache.cache_dir(str(tmp_path / "key")) == tmp_path / "key"  # the config key wins
    assert compile_cache.cache_dir("off") is None
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None and compile_cache.enable() is None


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.name.endswith("-cache")} if cache.exists() else set()


def test_second_sft_run_loads_the_programs_the_first_wrote(tmp_path):
    write_tiny_instruct_records(tmp_path / "data", count=8, two_images=False)
    cache = tmp_path / "jax_cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT), VIPER_SFT_DATA=str(tmp_path / "data"), VIPER_JAX_CACHE_DIR="off",
               XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip())

    def run(name: str) -> dict:
        workdir = tmp_path / name
        out = subprocess.run([sys.executable, "-m", "viper_jax", "sft", "--config", str(CONFIG), "--workdir",
                              str(workdir), "--config.steps=2", "--config.checkpoint.every_steps=2",
                              "--config.logging.progress_bar=false", "--config.logging.tensorboard=false",
                              f"--config.compile_cache_dir={cache}"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"compilation cache: {cache}" in out.stderr
        return json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])

    cold = run("cold")
    written = _entries(cache)
    assert written, "the first run wrote no cache entries"
    warm = run("warm")
    assert _entries(cache) == written  # every program of the second run was found: nothing new compiled
    print(f"first_step_seconds: cold {cold['first_step_seconds']:.2f}, warm {warm['first_step_seconds']:.2f}")
    assert cold["first_step_seconds"] == cold["seconds"] and "first_step_seconds" in warm
