"""Make glibc keep freed host memory, so XLA:CPU's per-call temporaries stop page-faulting.

XLA:CPU allocates an executable's temporaries as one block per call (560 MB for the ~30M-parameter
training step of scripts/bench_model.py) and frees it when the call ends. glibc serves a block that
large with mmap and frees it with munmap, so every call faults all its pages in again: 140k minor
faults, 0.25-0.5 s of kernel time in a 1.5 s step on a 2-core EPYC. With mmap off, one arena and
trimming off, glibc keeps the freed block in its heap and the next call reuses it.

The price: resident memory stays at its peak (tcmalloc behaves the same way). That is the right trade
for a process that runs one training step after another on the CPU backend, and the wrong one on a
TPU/GPU host, where XLA's buffers live on the device and the host's large blocks are one-off
(checkpoint copies) and should go back to the kernel. Hence opt-in: `keep_freed_host_memory=true` in
the trainer config (`viper train` applies it before JAX starts); the benchmarks in scripts/ turn it on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading

log = logging.getLogger(__name__)

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# -1 turns trimming off (mallopt(3)): glibc stores it as SIZE_MAX. A positive int stops at 2 GiB, less
# than the temporaries of a GRPO update over 32 responses, which would then go back every step.
NO_TRIM = -1


def keep_freed_host_memory() -> bool:
    """Sets the glibc malloc options above for this process; returns whether they took effect.

    Call it before JAX starts its CPU client (before the first computation): a thread that has
    already allocated keeps its own arena, whose large blocks glibc always maps and unmaps. Returns
    False, with a log line saying why, when JAX's backends already run (too late to help), the C
    library is not glibc, or glibc refuses an option.
    """
    # JAX's private module, looked up softly so that a rename cannot break `viper train`
    # (tests/test_host_memory.py's "late" case fails instead).
    initialized = getattr(sys.modules.get("jax._src.xla_bridge"), "backends_are_initialized", None)
    if initialized is not None and initialized():
        log.warning("keep_freed_host_memory: JAX's backends already run and their threads keep their own "
                    "malloc arenas; call it before the first computation. malloc left as is")
        return False
    libc_path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_path)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError, TypeError) as e:
        log.warning("keep_freed_host_memory: the C library (%s) is not glibc (%s); malloc left as is",
                    libc_path, e)
        return False
    if threading.active_count() > 1:
        log.warning("keep_freed_host_memory: %d Python threads already run; those that allocated keep "
                    "their own malloc arenas", threading.active_count())
    for name, option, value in (("M_ARENA_MAX", M_ARENA_MAX, 1), ("M_MMAP_MAX", M_MMAP_MAX, 0),
                                ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, NO_TRIM)):
        if libc.mallopt(option, value) != 1:
            log.warning("keep_freed_host_memory: glibc %s refused mallopt(%s, %d)", version, name, value)
            return False
    log.info("keep_freed_host_memory: glibc %s keeps freed memory (no mmap, one arena, no trimming)", version)
    return True
