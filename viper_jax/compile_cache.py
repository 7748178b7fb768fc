"""JAX's persistent compilation cache, on by default for `viper train`, `viper sft`, `viper generate` and
`viper eval`: a rerun (a resume, the next round of a loop, the same eval again) loads its compiled programs
instead of compiling them again.

Where: the config key `compile_cache_dir` (train, sft), else $VIPER_JAX_CACHE_DIR, else JAX's own
$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/viper_jax/jax_cache (~/.cache/viper_jax/jax_cache).
"off" (in the key or the variable) turns it off. Every program is cached, however quick its compile or
small its entry (JAX's defaults skip programs compiled in under a second, most of a CPU run's), unless
$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS / $JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES say otherwise.
The cache is never trimmed: delete the folder to reclaim its space. Must run before the process's first
compile (JAX decides once whether it uses a cache).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "VIPER_JAX_CACHE_DIR"
OFF = ("off", "none", "false", "0")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "viper_jax" / "jax_cache"


def cache_dir(configured: str = "") -> Path | None:
    """The cache folder `enable` uses (None: off), by the precedence in the module docstring."""
    choice = str(configured or os.environ.get(ENV, "")).strip()
    if choice.lower() in OFF:
        return None
    if not choice:
        choice = os.environ.get("JAX_COMPILATION_CACHE_DIR", "") or str(default_dir())
    return Path(choice).expanduser().absolute()


def enable(configured: str = "") -> Path | None:
    """Turns the persistent compilation cache on (see the module docstring); returns its folder or None."""
    import jax

    path = cache_dir(configured)
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
