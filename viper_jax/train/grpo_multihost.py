"""Where a GRPO step's batch lives: in one process (host NumPy, the single-process trainer) or split
over several JAX processes (global arrays built from process-local rows). GRPOLearner (grpo_step.py)
calls these hooks and is otherwise the same for both.

Several processes (`MultiProcess`):
- rl.prompts_per_step and rl.micro_batch_prompts are global counts; each process reads
  prompts_per_step / process_count prompts per step and keeps them (distributed.py).
- Rollout: one global batch for the jitted engine (rollout/global_rollout.py); each process reads back
  the samples of its own prompts, decodes and scores them. A group never spans processes, so group
  advantages are computed locally.
- Update: minibatch m (one optimizer update) is the m-th block of every process's prompts, and so are
  micro-batches; with one process this is exactly the single-process split. With several processes
  and rl.num_minibatches > 1, a minibatch therefore holds prompts of every process instead of a
  contiguous run of the global batch. Loss denominators (token and sequence counts) are global sums,
  so every process takes the same branches (skip an empty minibatch, or not) and the gradient is the
  global minibatch's.
- Packed update (rl.packing, packing.py): each process packs its own prompts of a minibatch, cut by its
  own lengths, so counts and shapes differ; `agree_packed` allgathers every process's plan (micro-batches
  per minibatch, each one's prompt range, row and predicted-slot counts), pads every micro-batch to the
  maxima (packing.pad_packed; empty ones for a process with fewer) and builds the global arrays from the
  process blocks, images as in the padded path (`_vision`). Same jitted calls on every process, same
  gradient as the padded update.
- Metrics: per-sample values (reward, its components, lengths, advantages) are allgathered, a few
  numbers per sample, and the metrics are computed over the global batch, so they are the numbers one
  process would log for the same batch, and all processes agree on them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from viper_jax.distributed import ProcessBlocks, allgather, block_vision_inputs, pad_rows
from viper_jax.rollout.engine import RolloutConfig, RolloutResult, generate
from viper_jax.rollout.global_rollout import GlobalPrompts, gather_prompts, generate_global
from viper_jax.train.config import ConfigError, minibatches_per_pass
from viper_jax.train.grpo_batch import RolloutBatch, row_inputs, update_inputs
from viper_jax.train.packing import PER_TOKEN, MicroBatch, pad_packed

_ON_AXIS_1 = {"positions", *(name for name, _ in PER_TOKEN)}  # packed arrays whose process blocks are on axis 1
logger = logging.getLogger(__name__)


class SingleProcess:
    """Everything on this process's host: the behaviour of a one-process run."""

    count = 1

    def rollout(self, model: Qwen2_5_VL, batch: dict[str, Any], pixels: np.ndarray | None, rng: Any,
                cfg: RolloutConfig) -> tuple[RolloutResult, np.ndarray, np.ndarray, bool]:
        """(samples, prompt ids and mask as sampled, whether the batch has images)."""
        grid = batch.get("image_grid_thw")
        has_images = grid is not None and len(grid) > 0
        samples = generate(model, batch["input_ids"], batch["attention_mask"], rng, cfg, pixel_values=pixels,
                      image_grid_thw=grid if has_images else None)
        ids, mask = np.asarray(batch["input_ids"], np.int32), np.asarray(batch["attention_mask"], np.int32)
        return samples, ids, mask, has_images

    def micro_inputs(self, batch: RolloutBatch, start: int, stop: int, config: Qwen2_5_VLConfig) -> dict[str, Any]:
        return update_inputs(batch, start, stop, config)

    local_inputs = micro_inputs  # what packing packs: here the micro-batch's own inputs

    def agree_packed(self, minibatches: list[list[MicroBatch]], batch: RolloutBatch,
                     config: Qwen2_5_VLConfig) -> list[list[MicroBatch]]:
        return minibatches

    def to_host(self, array: Any, axis: int = 0) -> np.ndarray:
        return np.asarray(array)

    def from_host(self, x: np.ndarray, axis: int = 0) -> Any:
        return x

    def sum(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def max(self, x: float) -> float:
        return x

    def gather_rows(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return rows


class MultiProcess:
    """This process's prompts as its blocks of global arrays; see the module docstring."""

    def __init__(self, blocks: ProcessBlocks):
        self.blocks = blocks
        self.count = blocks.count
        self._prompts: GlobalPrompts | None = None  # the current step's agreed metadata
        self._told_uneven = False  # agree_packed's note, logged once

    def rollout(self, model: Qwen2_5_VL, batch: dict[str, Any], pixels: np.ndarray | None, rng: Any,
                cfg: RolloutConfig) -> tuple[RolloutResult, np.ndarray, np.ndarray, bool]:
        grid = batch.get("image_grid_thw")
        self._prompts = gather_prompts(self.blocks, batch["input_ids"], batch["attention_mask"],
                                       grid if grid is not None and len(grid) > 0 else None,
                                       batch.get("images_per_sample"), cfg.prompt_buckets, cfg.pad_token_id)
        samples = generate_global(model, self._prompts, rng, cfg, self.blocks, pixels)
        return samples, self._prompts.input_ids, self._prompts.attention_mask, self._prompts.has_images

    def micro_inputs(self, batch: RolloutBatch, start: int, stop: int, config: Qwen2_5_VLConfig) -> dict[str, Any]:
        """update_inputs' dict for prompts [start, stop) of EVERY process, as global arrays."""
        out = self._vision(batch, [(start, stop)] * self.count, config)
        local = self.local_inputs(batch, start, stop, config)
        out.update({k: self.blocks.put(v, axis=1 if k == "positions" else 0) for k, v in local.items()})
        return out

    def local_inputs(self, batch: RolloutBatch, start: int, stop: int, config: Qwen2_5_VLConfig) -> dict[str, Any]:
        """This process's prompts [start, stop) without images (host NumPy), positions as the rollout had them."""
        return row_inputs(batch, start, stop, self._grid(self.blocks.position, start, stop), config)

    def _grid(self, k: int, start: int, stop: int) -> np.ndarray | None:
        """The image grids of prompts [start, stop) of the process in block k (from the step's allgathered
        grids; empty when it has none there), or None when no prompt of the step has images."""
        if self._prompts is None or not self._prompts.has_images:
            return None
        first = np.concatenate([[0], np.cumsum(self._prompts.images_per_prompt[k])])
        return self._prompts.grids[k][first[start]:first[stop]]

    def _vision(self, batch: RolloutBatch, ranges: list[tuple[int, int]], config: Qwen2_5_VLConfig) -> dict[str, Any]:
        """pixel_values (this process's block) and vision_inputs of the images of every process k's prompts
        ranges[k] (block order); empty when none of them has an image."""
        grids = [self._grid(k, a, b) for k, (a, b) in enumerate(ranges)]
        if grids[0] is None or not any(len(x) for x in grids):
            return {}
        start, stop = ranges[self.blocks.position]
        local = np.zeros((0, config.vision.patch_dim), np.float32)
        if len(grids[self.blocks.position]):
            first_image = np.concatenate([[0], np.cumsum(batch.images_per_prompt)])
            first_row = np.concatenate([[0], np.cumsum(batch.image_grid_thw.prod(axis=1))])
            local = batch.pixel_values[first_row[first_image[start]]:first_row[first_image[stop]]]
        block = self.blocks.block_rows(max(int(x.prod(axis=1).sum()) for x in grids))
        return {"pixel_values": self.blocks.put(pad_rows(local, block)),
                "vision_inputs": block_vision_inputs(grids, block, config.vision)}

    def agree_packed(self, minibatches: list[list[MicroBatch]], batch: RolloutBatch,
                     config: Qwen2_5_VLConfig) -> list[list[MicroBatch]]:
        """Every process's packed micro-batches (packing.pack_minibatch over local_inputs) made alike, then
        global: per minibatch the most micro-batches any process has, each grown to the largest prompt, row
        and predicted-slot counts of its counterparts (packing.pad_packed; a process short of micro-batches
        runs empty ones), so every process makes the same jitted calls on the same shapes."""
        every_count = allgather(np.asarray([len(mb) for mb in minibatches], np.int32))  # [processes, minibatches]
        counts = every_count.max(axis=0)
        if not self._told_uneven and (every_count != counts).any():
            self._told_uneven = True  # the cost of packing per process: the shorter ones wait on empty passes
            logger.info("packing: processes cut minibatches into different numbers of micro-batches (by block: %s); "
                        "the shorter ones run empty micro-batches to match (logged once)",
                        np.stack(self.blocks.in_order(list(every_count))).tolist())
        first = np.concatenate([[0], np.cumsum(counts)])
        plan = np.zeros((int(first[-1]), 4), np.int32)  # per agreed micro-batch: prompts [a, b), rows, slots
        for m, mb in enumerate(minibatches):
            for j, micro in enumerate(mb):
                plan[first[m] + j] = (*micro.prompts, micro.inputs["ids"].shape[0], micro.inputs["pred_index"].shape[0])
        every = np.stack(self.blocks.in_order(list(allgather(plan))), axis=1)  # [micro-batches, blocks, 4]
        out = []
        for m, mb in enumerate(minibatches):
            agreed = []
            for j, shapes in enumerate(every[first[m]:first[m + 1]]):
                # Prompt, row and slot counts split over this process's devices: multiples of its shard count.
                prompts, rows, slots = (self.blocks.block_rows(int(x.max()))
                                        for x in (shapes[:, 1] - shapes[:, 0], shapes[:, 2], shapes[:, 3]))
                micro = pad_packed(mb[min(j, len(mb) - 1)], prompts, rows, slots, config.text.pad_token_id,
                                   keep=j < len(mb))
                agreed.append(self._global_packed(micro, batch, [tuple(x) for x in shapes[:, :2].tolist()], config))
            out.append(agreed)
        return out

    def _global_packed(self, micro: MicroBatch, batch: RolloutBatch, ranges: list[tuple[int, int]],
                       config: Qwen2_5_VLConfig) -> MicroBatch:
        """Same-shaped local packed micro-batches -> global arrays, process blocks in order: indices into the
        prompts (prompt_src) and into the rows (pred_index) shifted by this process's block."""
        x, k, put = micro.inputs, self.blocks.position, self.blocks.put
        (prompts, tp), (rows, row_len) = x["prompt_ids"].shape, x["ids"].shape
        x = dict(x, prompt_src=np.where(x["prompt_src"] >= 0, x["prompt_src"] + k * prompts * tp, -1),
                 pred_index=x["pred_index"] + k * rows * row_len)
        # Per-token arrays [1, K] and positions [3, rows, L] hold the blocks on axis 1 (micro.axis).
        inputs = {name: put(v, axis=1 if name in _ON_AXIS_1 else 0) for name, v in x.items()}
        inputs.update(self._vision(batch, ranges, config))
        return dataclasses.replace(micro, inputs=inputs)

    def to_host(self, array: Any, axis: int = 0) -> np.ndarray:
        """This process's block (on `axis`: MicroBatch.axis) of a global per-row or per-token array."""
        return self.blocks.local(array, axis)

    def from_host(self, x: np.ndarray, axis: int = 0) -> Any:
        return self.blocks.put(x, axis)

    def sum(self, x: np.ndarray) -> np.ndarray:
        return allgather(x).sum(axis=0)

    def max(self, x: float) -> float:
        return float(allgather(np.asarray([x], np.float32)).max())

    def gather_rows(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-sample values of every process, concatenated in global (block) order."""
        out = {}
        for key, x in rows.items():
            x = np.asarray(x)
            out[key] = self.blocks.gather_rows(x.astype(np.int32)).astype(bool) if x.dtype == bool else \
                self.blocks.gather_rows(x)
        return out


def check_split(rl: ConfigDict, blocks: ProcessBlocks) -> None:
    """With several processes every minibatch takes the same number of prompts from each process, and
    every padded micro-batch is a global array whose prompts split evenly over the batch shards (data x
    fsdp): refused before loading. Packed micro-batches are padded to shapes every shard divides
    (MultiProcess.agree_packed), so rl.micro_batch_prompts has no such constraint there."""
    n, shards = blocks.count, blocks.count * blocks.per_process
    per_minibatch = rl.prompts_per_step // minibatches_per_pass(rl)
    if rl.get("packing", False):
        if per_minibatch % n:
            raise ConfigError(f"config rl: with {n} processes and rl.packing the prompts of every minibatch "
                              f"(rl.update_prompts = {per_minibatch}) must be a multiple of the process count: "
                              "each process packs its own share")
        return
    micro = rl.micro_batch_prompts or per_minibatch
    if micro % shards:
        raise ConfigError(f"config rl: with {n} processes the prompts of every micro-batch (rl.micro_batch_prompts, "
                          f"or else the update batch rl.update_prompts = {micro}) must be a multiple of the mesh's "
                          f"{shards} batch shards (data x fsdp): each process feeds its share to its own devices")
