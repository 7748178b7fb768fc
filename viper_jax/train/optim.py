"""The optimizer: global-norm clipping then AdamW, with warmup followed by a constant or cosine rate.

Gradient accumulation is not an optax wrapper here: the GRPO update sums micro-batch gradients of a
loss whose denominators (token or sequence counts) are those of the whole minibatch, then applies one
update (grpo_step.py). So the schedule counts optimizer updates, not micro-batches.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from viper_common.config_overrides import ConfigError


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


def _path_name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def frozen_labels(params: Any, frozen: tuple[str, ...]) -> Any:
    """"frozen" for every parameter whose dotted path starts with one of `frozen` (e.g. "visual" or
    "visual.blocks"), "train" for the rest."""
    matched: set[str] = set()

    def label(path: tuple, _: Any) -> str:
        name = _path_name(path)
        hits = {f for f in frozen if name == f or name.startswith(f + ".")}
        matched.update(hits)
        return "frozen" if hits else "train"

    labels = jax.tree_util.tree_map_with_path(label, params)
    if set(frozen) - matched:  # a typo must not silently train what was meant to stay fixed
        raise ConfigError(f"config optim.frozen: {sorted(set(frozen) - matched)} match no parameter; "
                         f"top-level names: {sorted(params) if isinstance(params, dict) else '?'}")
    return labels


def make_optimizer(cfg: Any, total_updates: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip + AdamW on the trained parameters; `cfg.frozen` path prefixes get no update (and no optimizer
    moments), e.g. a random vision tower kept fixed while a model learns to read it."""
    schedule = make_schedule(cfg, total_updates)
    adamw = optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                        weight_decay=float(cfg.weight_decay),
                        mask=None if cfg.decay_norms_and_biases else _decay_mask)
    parts = [optax.clip_by_global_norm(float(cfg.grad_clip))] if cfg.grad_clip > 0 else []
    tx = optax.chain(*parts, adamw)
    frozen = tuple(cfg.get("frozen", ()))
    if frozen:
        # The clip sees only the trained parameters' gradients: a frozen part does not shrink their step.
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   lambda params: frozen_labels(params, frozen))
    return tx, schedule
