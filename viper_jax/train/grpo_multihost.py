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
- Metrics: per-sample values (reward, its components, lengths, advantages) are allgathered, a few
  numbers per sample, and the metrics are computed over the global batch, so they are the numbers one
  process would log for the same batch, and all processes agree on them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ml_collections import ConfigDict

from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from viper_jax.distributed import ProcessBlocks, allgather, block_vision_inputs, pad_rows
from viper_jax.rollout.engine import RolloutConfig, RolloutResult, generate
from viper_jax.rollout.global_rollout import GlobalPrompts, gather_prompts, generate_global
from viper_jax.train.config import ConfigError, minibatches_per_pass
from viper_jax.models.qwen2_5_vl.rope_index import prompt_positions
from viper_jax.train.grpo_batch import RolloutBatch, full_positions, update_inputs


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

    def to_host(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def from_host(self, x: np.ndarray) -> Any:
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
        g, put = batch.group_size, self.blocks.put
        rows = slice(start * g, stop * g)
        ids, mask = batch.prompt_ids[start:stop], batch.prompt_mask[start:stop]
        out: dict[str, Any] = {}
        grid = None
        if self._prompts is not None and self._prompts.has_images:
            # Every process's images of its prompts [start, stop), from the step's allgathered grids.
            grids = []
            for every, per_prompt in zip(self._prompts.grids, self._prompts.images_per_prompt):
                first = np.concatenate([[0], np.cumsum(per_prompt)])
                grids.append(every[first[start]:first[stop]])
            grid = grids[self.blocks.position]
            if any(len(x) for x in grids):
                first_image = np.concatenate([[0], np.cumsum(batch.images_per_prompt)])
                first_row = np.concatenate([[0], np.cumsum(batch.image_grid_thw.prod(axis=1))])
                local = np.zeros((0, config.vision.patch_dim), np.float32)
                if len(grid):
                    local = batch.pixel_values[first_row[first_image[start]]:first_row[first_image[stop]]]
                block = self.blocks.block_rows(max(int(x.prod(axis=1).sum()) for x in grids))
                out["pixel_values"] = put(pad_rows(local, block))
                out["vision_inputs"] = block_vision_inputs(grids, block, config.vision)
        n = batch.tokens.shape[1]
        out.update(prompt_ids=put(ids), prompt_mask=put(mask),
                   positions=put(full_positions(prompt_positions(ids, mask, grid, config), n, g), axis=1),
                   tokens=put(batch.tokens[rows]), resp_mask=put(batch.resp_mask[rows]),
                   advantages=put(batch.advantages[rows]), old_logp=put(batch.old_logp[rows]))
        return out

    def to_host(self, array: Any) -> np.ndarray:
        """This process's rows of a global per-row array."""
        return self.blocks.local(array)

    def from_host(self, x: np.ndarray) -> Any:
        return self.blocks.put(x)

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
    """With several processes every micro-batch is a global array whose prompts split evenly over the
    batch shards (data x fsdp), each process holding the same number: refused before loading."""
    n, shards = blocks.count, blocks.count * blocks.per_process
    if rl.get("packing", False):
        # Packed micro-batches are cut per process by its own lengths; several processes would have to agree
        # on their count and shapes first (not built).
        raise ConfigError(f"config rl.packing: runs in one JAX process, and this run has {n}; set it to false")
    per_minibatch = rl.prompts_per_step // minibatches_per_pass(rl)
    micro = rl.micro_batch_prompts or per_minibatch
    if micro % shards:
        raise ConfigError(f"config rl: with {n} processes the prompts of every micro-batch (rl.micro_batch_prompts, "
                          f"or else the update batch rl.update_prompts = {micro}) must be a multiple of the mesh's "
                          f"{shards} batch shards (data x fsdp): each process feeds its share to its own devices")
