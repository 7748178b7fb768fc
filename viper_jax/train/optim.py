"""The optimizer: global-norm clipping then AdamW, with warmup followed by a constant or cosine rate.

Gradient accumulation is not an optax wrapper here: the GRPO update sums micro-batch gradients of a
loss whose denominators (token or sequence counts) are those of the whole minibatch, then applies one
update (grpo_step.py). So the schedule counts optimizer updates, not micro-batches.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def make_schedule(cfg: Any, total_updates: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps` updates, then constant or cosine to lr * final_lr_fraction."""
    lr, warmup = float(cfg.learning_rate), int(cfg.warmup_steps)
    if cfg.schedule == "cosine":
        # optax counts decay_steps from 0 including the warmup.
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_updates, warmup + 1),
                                                  end_value=lr * float(cfg.final_lr_fraction))
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def _decay_mask(params: Any) -> Any:
    """True for weight matrices and embeddings; False for biases and norm scales (by leaf name)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", path[-1])) not in ("bias", "scale"), params)


def make_optimizer(cfg: Any, total_updates: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_updates)
    adamw = optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                        weight_decay=float(cfg.weight_decay),
                        mask=None if cfg.decay_norms_and_biases else _decay_mask)
    parts = [optax.clip_by_global_norm(float(cfg.grad_clip))] if cfg.grad_clip > 0 else []
    return optax.chain(*parts, adamw), schedule
