"""Several JAX processes (TPU pod slices, GPU clusters): starting them, and global batches from each
process's own rows.

Start-up, `jax.distributed.initialize` from config or environment:
- Cloud TPU pod slices: every worker runs the same command; JAX discovers the coordinator, process
  count and id from the TPU metadata (`initialize()` with no arguments).
- GPU clusters / anything else: an explicit coordinator address, process count and id, from config
  or from VIPER_COORDINATOR / VIPER_NUM_PROCESSES / VIPER_PROCESS_ID (Slurm is auto-detected by JAX).
- One process (the default): nothing to do.
Only process 0 writes logs and metrics (`is_main_process()`).

Every process reads its own records (data/pipeline.py: `ds[process_index::process_count]`) and keeps
them. A global `jax.Array` is assembled with `jax.make_array_from_process_local_data`, each process
supplying only the rows its own devices hold, and results come back the same way (`local_rows`).
Between hosts only small metadata travels (`allgather*`: prompt widths, image grids, per-row rewards
and counts, JSON states); pixel data never does (inside jit, XLA moves what the vision tower's gathers
need from device to device).

Layout: the batch mesh axes (data x fsdp, or whatever the `batch` rule names) must give each process
one contiguous block of rows of equal size. `ProcessBlocks` records which block each process holds (in
process order on CPU and GPU; TPU device meshes may permute it) and a global batch is the processes'
local rows in that block order. Image pixels follow the same blocks (`block_vision_inputs`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from viper_jax.models.qwen2_5_vl import VisionInputs, prepare_vision
from viper_jax.models.qwen2_5_vl.config import VisionConfig
from viper_jax.sharding import DEFAULT_RULES, logical_to_spec


# ------------------------------------------------------------------------------------------------ start-up

def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               cpu_collectives: str | None = None, timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> None:
    """Starts the JAX distributed runtime when more than one process takes part.

    auto=True calls `jax.distributed.initialize()` with no arguments (Cloud TPU, Slurm auto-detect).
    cpu_collectives: "gloo" lets several CPU processes form one mesh (used by tests on localhost).
    timeout_s: how long to wait for every process to reach the coordinator.
    heartbeat_timeout_s: a process silent this long counts as dead and every other one stops (JAX's
    coordination service; 100 s is JAX's default). See peer_loss.py for how a survivor reports it.
    Must run before anything touches a JAX device (jax.devices() included).
    """
    coordinator = coordinator or os.environ.get("VIPER_COORDINATOR")
    num_processes = num_processes or _env_int("VIPER_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("VIPER_PROCESS_ID")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if auto:
        jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
        return
    if coordinator is None and (num_processes or 1) == 1:
        return
    missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
        raise ValueError(f"multi-process start needs {missing}: set them in config.distributed or as "
                         f"VIPER_COORDINATOR / VIPER_NUM_PROCESSES / VIPER_PROCESS_ID")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)


def initialize_from_config(cfg: Any) -> None:
    """`cfg` is the `distributed` ConfigDict: coordinator, num_processes, process_id, auto, cpu_collectives,
    timeout_s, heartbeat_timeout_s."""
    heartbeat = int(cfg.get("heartbeat_timeout_s", 100))
    if heartbeat < 1:
        raise ValueError(f"distributed.heartbeat_timeout_s must be at least 1 (seconds), got {heartbeat}")
    initialize(cfg.get("coordinator") or None, cfg.get("num_processes") or None,
               cfg.get("process_id") if cfg.get("process_id", -1) >= 0 else None,
               auto=bool(cfg.get("auto", False)), cpu_collectives=cfg.get("cpu_collectives") or None,
               timeout_s=int(cfg.get("timeout_s", 300)), heartbeat_timeout_s=heartbeat)


def is_main_process() -> bool:
    return jax.process_index() == 0


def quiet_non_main_logging(level: int = logging.WARNING) -> None:
    """Only process 0 logs at INFO: other processes keep warnings and errors only."""
    if not is_main_process():
        logging.getLogger().setLevel(level)
        logging.getLogger("viper_jax").setLevel(level)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


# ------------------------------------------------------------------------------------------------ host metadata

def allgather(x: Any) -> np.ndarray:
    """[process_count, *x.shape]: every process's `x` (same shape and dtype everywhere), by process index."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def allgather_ragged(x: Any) -> list[np.ndarray]:
    """Every process's `x`, whose leading dimension may differ between processes, by process index."""
    x = np.asarray(x)
    lengths = allgather(np.asarray([x.shape[0]], np.int32))[:, 0]
    # Padded to a power of two: the gather compiles once per padded shape, so few shapes, few compiles.
    padded = np.zeros((_pow2(int(lengths.max())), *x.shape[1:]), x.dtype)
    padded[:x.shape[0]] = x
    every = allgather(padded)
    return [every[p, :n] for p, n in enumerate(lengths.tolist())]


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj` (record ids, data iterator states), by process index."""
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    return [json.loads(bytes(b).decode()) for b in allgather_ragged(data)]


# ------------------------------------------------------------------------------------------------ row blocks

@dataclasses.dataclass(frozen=True)
class ProcessBlocks:
    """Which block of a batch-sharded axis each process's devices hold.

    order[k]: the process whose rows are block k; position: this process's block; per_process: batch
    shards per process (a process's row count must be a multiple of it).
    """

    mesh: Mesh
    spec: Any  # the batch rule's mesh axes (a PartitionSpec entry)
    order: tuple[int, ...]
    position: int
    per_process: int

    @classmethod
    def of(cls, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> "ProcessBlocks":
        """Refuses (NotImplementedError) a mesh whose batch axes do not give every process its own block."""
        entry = logical_to_spec(("batch",), rules)[0]
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        shards = math.prod(mesh.shape[a] for a in axes)
        n = jax.process_count()
        starts: dict[int, set[int]] = {}
        for device, index in NamedSharding(mesh, P(entry)).devices_indices_map((shards,)).items():
            starts.setdefault(device.process_index, set()).add(index[0].start or 0)
        per = shards // n
        for p in range(n):
            rows = sorted(starts.get(p, ()))
            if shards % n or not rows or rows != list(range(rows[0], rows[0] + per)) or rows[0] % per:
                raise NotImplementedError(
                    f"{n} processes on mesh {dict(mesh.shape)}: the batch axes {axes or '()'} ({shards} shards) must "
                    f"give every process one contiguous block of rows (process {p} holds shards {rows}). Each process "
                    "feeds only the records it read, so no host may need rows of another: split data/fsdp across "
                    "hosts and keep the tensor axis within a host")
        order = tuple(sorted(range(n), key=lambda p: min(starts[p])))
        return cls(mesh, entry, order, order.index(jax.process_index()), per)

    @property
    def count(self) -> int:
        return len(self.order)

    def sharding(self, ndim: int, axis: int = 0) -> NamedSharding:
        spec = [None] * ndim
        spec[axis] = self.spec
        return NamedSharding(self.mesh, P(*spec))

    def put(self, local: Any, axis: int = 0) -> jax.Array:
        """The global array whose `axis` is every process's `local` (same shape everywhere), in block order."""
        local = np.asarray(local)
        shape = list(local.shape)
        shape[axis] *= self.count
        return jax.make_array_from_process_local_data(self.sharding(local.ndim, axis), local, tuple(shape))

    def local(self, array: jax.Array, axis: int = 0) -> np.ndarray:
        """This process's block of a global array (resharded to the batch layout first if needed)."""
        target = self.sharding(array.ndim, axis)
        if not array.sharding.is_equivalent_to(target, array.ndim):
            array = jax.device_put(array, target)
        pieces: dict[int, Any] = {}
        for shard in array.addressable_shards:  # replicas (e.g. over `tensor`) hold the same rows: keep one
            pieces.setdefault(shard.index[axis].start or 0, shard.data)
        return np.concatenate([np.asarray(pieces[k]) for k in sorted(pieces)], axis=axis)

    def in_order(self, per_process: Sequence[Any]) -> list[Any]:
        """Values indexed by process (as `allgather*` return them) -> the same values in block order."""
        return [per_process[p] for p in self.order]

    def gather_rows(self, x: np.ndarray) -> np.ndarray:
        """Every process's `x` (same shape), concatenated along axis 0 in block order: the global rows."""
        every = allgather(x)
        return np.concatenate(self.in_order(list(every)), axis=0)

    def block_rows(self, rows: int) -> int:
        """`rows` rounded up to a whole number of rows per local batch shard."""
        return -(-max(rows, 1) // self.per_process) * self.per_process


# ------------------------------------------------------------------------------------------------ images

def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """`x` with zero rows appended up to `rows`."""
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)], axis=0)


def block_vision_inputs(grids: Sequence[np.ndarray], block_rows: int, config: VisionConfig) -> VisionInputs:
    """VisionInputs for pixel rows laid out in equal blocks, one per process in block order: block k
    holds the patch rows of grids[k]'s images, then zero rows up to `block_rows`.

    Why this layout: each process supplies its own block with make_array_from_process_local_data, so
    pixels never cross hosts except through XLA's collectives, and processes whose images differ in
    size or number differ only in how much of their block is padding. (A fixed patch budget per prompt
    row would also work, but pads every prompt to the largest image set and wastes vision compute.)
    Everything in VisionInputs except `patch_perm` indexes the window-ordered sequence of REAL patches,
    so it is prepare_vision's over the concatenated grids, unchanged; only patch_perm, which picks input
    rows, is shifted to each process's block. The tower never reads a padding row, computes exactly
    what one process computes over the concatenated images, and returns merged tokens in global image
    order: the order of the image placeholders in the global prompt batch.
    """
    grids = [np.asarray(g, np.int64).reshape(-1, 3) for g in grids]
    counts = np.asarray([int(g.prod(axis=1).sum()) for g in grids], np.int64)
    if counts.max() > block_rows:
        raise ValueError(f"a process has {counts.max()} patch rows, more than the block of {block_rows}")
    vi = prepare_vision(np.concatenate(grids), config)
    real_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shift = np.repeat(np.arange(len(grids)) * block_rows - real_start, counts)  # per real row: its block offset
    return dataclasses.replace(vi, patch_perm=(vi.patch_perm + shift[vi.patch_perm]).astype(np.int32))
