"""Multi-host start-up: `jax.distributed.initialize` from config or environment.

- Cloud TPU pod slices: every worker runs the same command; JAX discovers the coordinator, process
  count and id from the TPU metadata (`initialize()` with no arguments).
- GPU clusters / anything else: an explicit coordinator address, process count and id, from config
  or from VIPER_COORDINATOR / VIPER_NUM_PROCESSES / VIPER_PROCESS_ID (Slurm is auto-detected by JAX).
- One process (the default): nothing to do.
Only process 0 writes logs and metrics (`is_main_process()`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               cpu_collectives: str | None = None, timeout_s: int = 300) -> None:
    """Starts the JAX distributed runtime when more than one process takes part.

    auto=True calls `jax.distributed.initialize()` with no arguments (Cloud TPU, Slurm auto-detect).
    cpu_collectives: "gloo" lets several CPU processes form one mesh (used by tests on localhost).
    timeout_s: how long to wait for every process to reach the coordinator.
    Must run before anything touches a JAX device (jax.devices() included).
    """
    coordinator = coordinator or os.environ.get("VIPER_COORDINATOR")
    num_processes = num_processes or _env_int("VIPER_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("VIPER_PROCESS_ID")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if auto:
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return
    if coordinator is None and (num_processes or 1) == 1:
        return
    missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
        raise ValueError(f"multi-process start needs {missing}: set them in config.distributed or as "
                         f"VIPER_COORDINATOR / VIPER_NUM_PROCESSES / VIPER_PROCESS_ID")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)


def initialize_from_config(cfg: Any) -> None:
    """`cfg` is the `distributed` ConfigDict: coordinator, num_processes, process_id, auto, cpu_collectives."""
    initialize(cfg.get("coordinator") or None, cfg.get("num_processes") or None,
               cfg.get("process_id") if cfg.get("process_id", -1) >= 0 else None,
               auto=bool(cfg.get("auto", False)), cpu_collectives=cfg.get("cpu_collectives") or None,
               timeout_s=int(cfg.get("timeout_s", 300)))


def is_main_process() -> bool:
    return jax.process_index() == 0


def quiet_non_main_logging(level: int = logging.WARNING) -> None:
    """Only process 0 logs at INFO: other processes keep warnings and errors only."""
    if not is_main_process():
        logging.getLogger().setLevel(level)
        logging.getLogger("viper_jax").setLevel(level)


def process_slice(global_batch: int, sharding: Any = None) -> slice:
    """The rows of a global batch this process feeds (each process loads only its own slice).

    With `sharding` (of the batch, e.g. `sharding.batch_sharding(mesh)`): the rows this process's
    devices hold under it, which is what `jax.make_array_from_process_local_data` expects; when the
    batch axes do not span processes, that is every row. Without it: equal contiguous blocks by
    process index (right for the default meshes, whose batch axes are the outer ones)."""
    if sharding is not None:
        starts = sorted({(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
                         for idx in sharding.addressable_devices_indices_map((global_batch,)).values()})
        lo, hi = starts[0][0], max(stop for _, stop in starts)
        covered = np.zeros(global_batch, bool)
        for a, b in starts:
            covered[a:b] = True
        if not covered[lo:hi].all():
            raise ValueError(f"this process's batch rows are not contiguous under {sharding}: {starts}")
        return slice(lo, hi)
    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} does not divide over {count} processes")
    per = global_batch // count
    return slice(index * per, (index + 1) * per)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
