"""One GRPO step: rollout -> reward -> group advantages -> clipped policy updates (formulas in
grpo_loss.py; shared/reference/qwen2_5_vl_grpo_diffusers.md section C).

Update structure: the rollout batch (rl.prompts_per_step prompts) is cut into `num_minibatches`
minibatches of whole prompt groups (rl.update_prompts prompts each when set: config.minibatches_per_pass),
one optimizer update each, `ppo_epochs` passes, every one against the old log-probs taken once from the
rollout policy before the first update (PPO-style); each minibatch is cut into micro-batches (one
forward/backward each). Micro-batch losses use the minibatch's token (or sequence) count as their
denominator, so the summed gradients equal the gradient of the whole minibatch's loss. Gradients are
accumulated in a donated fp32 buffer by a host loop rather than a `lax.scan`, because micro-batches
with different images have different shapes.

A non-finite loss or gradient norm leaves parameters and optimizer state untouched; the skip is counted
in `TrainState.skipped` and reported per step.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from viper_jax.models.qwen2_5_vl import Qwen2_5_VL
from viper_jax.rl import grpo_loss
from viper_jax.rollout.engine import RolloutConfig, useful_slot_share
from viper_jax.rollout.stop import StopStrings
from viper_jax.sharding import DEFAULT_RULES, batch_shard_count, use_mesh
from viper_jax.train.config import minibatches_per_pass
from viper_jax.train.grpo_batch import RolloutBatch, response_mask, slices
from viper_jax.train.grpo_multihost import MultiProcess, SingleProcess
from viper_jax.train.packing import MicroBatch, pack_minibatch, packed_forward, padded_micro, response_width, \
    trim_responses
from viper_jax.train.state import TrainState, apply_gradients


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """The config's `rl` section (train/config.py holds the defaults and their meaning) plus the sampling
    temperature, as static data of the jitted update."""

    group_size: int
    num_minibatches: int  # resolved: rl.prompts_per_step / rl.update_prompts, or rl.num_minibatches
    micro_batch_prompts: int
    ppo_epochs: int
    eps_low: float
    eps_high: float
    dual_clip: float
    aggregation: str
    kl_coef: float
    kl_estimator: str
    entropy_coef: float
    advantage_scale: str
    advantage_eps: float
    drop_zero_spread: bool
    recompute_old_logprobs: bool
    logit_chunk: int
    packing: bool  # train/packing.py: prompt + response sequences packed into rows, real tokens only
    pack_tokens: int  # token budget of a packed micro-batch; 0 = the padded micro-batch's rows x width
    response_bucket: int  # > 0: response span cut to the longest counted response, rounded to this * 2^k
    temperature: float

    @classmethod
    def from_config(cls, rl: Any, temperature: float) -> "GRPOSettings":
        names = {f.name for f in dataclasses.fields(cls)} - {"temperature", "num_minibatches"}
        return cls(temperature=float(temperature), num_minibatches=minibatches_per_pass(rl),
                   **{k: rl[k] for k in names})

    @classmethod
    def with_defaults(cls, **changes: Any) -> "GRPOSettings":
        """The config schema's defaults (rl section, rollout.temperature) with `changes`."""
        from viper_jax.train.config import base_config

        config = base_config()
        return dataclasses.replace(cls.from_config(config.rl, config.rollout.temperature), **changes)


# ------------------------------------------------------------------------------------------------ forward

def response_logprobs(model: Qwen2_5_VL, hidden: jax.Array, targets: jax.Array, temperature: float,
                      chunk: int) -> tuple[jax.Array, jax.Array]:
    """(log-probs [R, N] of `targets`, entropies [R, N]) under logits / temperature from the response
    span's hidden states [R, N, D]. With `chunk`, the lm_head runs over chunks of response positions
    inside a rematerialised map, so [R, N, vocab] logits never exist at once (vocab 152K x 2K tokens)."""

    def one(h: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.logits_from_hidden(h)
        return grpo_loss.token_logprobs(logits, t, temperature), grpo_loss.entropy(logits, temperature)

    r, n, d = hidden.shape
    if not chunk or chunk >= n:
        return one(hidden, targets)
    k = -(-n // chunk)
    pad = k * chunk - n
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(r, k, chunk, d).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(r, k, chunk).swapaxes(0, 1)
    lp, ent = jax.lax.map(jax.checkpoint(lambda xs: one(*xs)), (h, t))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(r, k * chunk)[:, :n]
    return unchunk(lp), unchunk(ent)


def policy_forward(model: Qwen2_5_VL, micro: dict[str, Any], group_size: int, temperature: float,
                   chunk: int) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropies of the sampled response tokens under `model` (see grpo_batch.py), or at the
    prediction positions of packed rows (train/packing.py)."""
    if "segment_ids" in micro:
        return packed_forward(model, micro, temperature, chunk)
    prompt = model.embed(micro["prompt_ids"], micro.get("pixel_values"), micro.get("vision_inputs"))
    x = jnp.concatenate([jnp.repeat(prompt, group_size, axis=0), model.language_model.embed(micro["tokens"])], axis=1)
    mask = jnp.concatenate([jnp.repeat(micro["prompt_mask"], group_size, axis=0),
                            micro["resp_mask"].astype(micro["prompt_mask"].dtype)], axis=1)
    hidden, _ = model.language_model(x, micro["positions"], mask)
    tp, n = micro["prompt_ids"].shape[1], micro["tokens"].shape[1]
    # Position Tp-1+i (the last prompt token, then response tokens) predicts response token i.
    return response_logprobs(model, hidden[:, tp - 1:tp - 1 + n], micro["tokens"], temperature, chunk)


# ------------------------------------------------------------------------------------------------ jitted fns

class UpdateFns:
    """The jitted pieces of the update, compiled once per input shape set."""

    def __init__(self, graphdef: Any, optimizer: optax.GradientTransformation, shardings: TrainState,
                 settings: GRPOSettings, mesh: Any, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
        self.mesh, self.rules = mesh, tuple(rules)

        def forward(params: Any, micro: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
            with use_mesh(mesh, self.rules):  # traced here: the model's activation constraints apply
                return policy_forward(nnx.merge(graphdef, params), micro, settings.group_size, settings.temperature,
                                      settings.logit_chunk)

        def loss_fn(params: Any, micro: dict[str, Any], denoms: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
            logp, ent = forward(params, micro)
            mask = micro["resp_mask"]
            # norm_length: max_new_tokens (Dr. GRPO's constant), whatever width the rows were trimmed or packed to.
            agg = dict(num_tokens=denoms["tokens"], num_seqs=denoms["seqs"],
                       norm_length=denoms.get("norm_length", mask.shape[1]), seq_tokens=micro.get("seq_tokens"))
            pg, m = grpo_loss.policy_loss(logp, micro["old_logp"], micro["advantages"], mask, eps_low=settings.eps_low,
                                          eps_high=settings.eps_high, dual_clip=settings.dual_clip or None,
                                          aggregation=settings.aggregation, **agg)
            loss = pg
            tokens = mask.sum()
            sums = {k: v * tokens for k, v in m.items()}
            sums.update(tokens=tokens, pg_loss=pg, entropy=(ent * mask).sum())
            if settings.kl_coef > 0:
                kl = grpo_loss.kl_estimate(logp, micro["ref_logp"], settings.kl_estimator)
                loss = loss + settings.kl_coef * grpo_loss.aggregate(kl, mask, settings.aggregation, **agg)
                sums["kl"] = (kl * mask).sum()
            if settings.entropy_coef > 0:
                loss = loss - settings.entropy_coef * grpo_loss.aggregate(ent, mask, settings.aggregation, **agg)
            sums["loss"] = loss
            return loss, sums

        grad = jax.value_and_grad(loss_fn, has_aux=True)
        p_sh = shardings.params

        def accumulate(params, acc, micro, denoms):
            (_, sums), g = grad(params, micro, denoms)
            return jax.tree.map(jnp.add, acc, g), sums

        def apply(state: TrainState, grads: Any, loss: jax.Array) -> tuple[TrainState, dict]:
            new, grad_norm, ok = apply_gradients(state, grads, loss, optimizer)
            return new, {"grad_norm": grad_norm, "skipped": ~ok}

        self.logprobs = jax.jit(lambda params, micro: forward(params, micro)[0])
        # One gradient program for every micro-batch (a zero buffer starts each minibatch): a second
        # "first micro-batch" program would double the largest compile for no measurable gain.
        self.zeros = jax.jit(lambda params: jax.tree.map(jnp.zeros_like, params), out_shardings=p_sh)
        self.accumulate = jax.jit(accumulate, out_shardings=(p_sh, None), donate_argnums=(1,))
        self.apply = jax.jit(apply, out_shardings=(shardings, None), donate_argnums=(0,))


# ------------------------------------------------------------------------------------------------ the step

def advantages_and_mask(rewards: np.ndarray, lengths: np.ndarray, max_new_tokens: int, settings: GRPOSettings
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(advantages [R], loss mask [R, N], zero-spread flags [R]): with drop_zero_spread the mask of a
    group whose rewards are all equal is 0 (it also leaves the loss denominators)."""
    r = jnp.asarray(rewards, jnp.float32)
    adv = np.asarray(grpo_loss.group_advantages(r, settings.group_size, scale=settings.advantage_scale,
                                                eps=settings.advantage_eps))
    zero = np.asarray(grpo_loss.zero_spread_groups(r, settings.group_size))
    keep = ~zero if settings.drop_zero_spread else np.ones_like(zero)
    return adv.astype(np.float32), response_mask(lengths, max_new_tokens) * keep[:, None], zero


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    return (float(np.mean(x)), float(np.std(x))) if len(x) else (0.0, 0.0)


class GRPOLearner:
    """Owns the train state; `step(batch, rng, reward_fn)` runs one GRPO step and returns its metrics."""

    def __init__(self, graphdef: Any, state: TrainState, fns: UpdateFns, settings: GRPOSettings,
                 rollout: RolloutConfig, decode: Callable[[np.ndarray, np.ndarray], list[str]],
                 schedule: optax.Schedule, model_config: Any, ref_params: Any = None,
                 processes: SingleProcess | MultiProcess | None = None, stop: StopStrings | None = None):
        if settings.kl_coef > 0 and ref_params is None:
            raise ValueError("rl.kl_coef > 0 needs the reference parameters")
        self.graphdef, self.state, self.fns, self.settings = graphdef, state, fns, settings
        self.rollout_cfg = rollout
        self.decode, self.schedule, self.ref_params = decode, schedule, ref_params
        self.model_config = model_config
        self.stop = stop  # responses end at the first stop string (rollout.stop_strings), if any
        # Where the batch lives: this host only, or split over JAX processes (grpo_multihost.py).
        self.processes = processes or SingleProcess()

    def policy(self) -> Qwen2_5_VL:
        """The current policy as a model sharing the state's parameter buffers (no copy)."""
        return nnx.merge(self.graphdef, self.state.params)

    def step(self, batch: dict[str, Any], rng: jax.Array, reward_fn: Callable[..., Any]) -> dict[str, Any]:
        settings, t0, processes = self.settings, time.perf_counter(), self.processes
        model = self.policy()
        grid = batch.get("image_grid_thw")
        local_images = grid is not None and len(grid) > 0
        pixels = np.asarray(batch["pixel_values"])[:int(batch["num_patches"])] if local_images else None
        with use_mesh(self.fns.mesh, self.fns.rules):
            samples, prompt_ids, prompt_mask, has_images = processes.rollout(model, batch, pixels, rng,
                                                                             self.rollout_cfg)
        del model
        t1 = time.perf_counter()
        stopped = np.zeros(samples.lengths.shape, bool)
        if self.stop is not None:
            samples, stopped = self.stop.apply(samples, self.rollout_cfg.pad_token_id)
        responses = self.decode(samples.tokens, samples.lengths)
        if self.stop is not None:
            responses = self.stop.trim(responses)
        out = reward_fn(responses, [tuple(t) for t in batch["truth"]], samples.prompt_index)
        rewards = np.asarray(out.reward, np.float32)
        t2 = time.perf_counter()

        g = settings.group_size
        adv, mask, zero = advantages_and_mask(rewards, samples.lengths, samples.tokens.shape[1], settings)
        rollout_batch = RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, pixel_values=pixels,
                          image_grid_thw=np.asarray(grid if local_images else np.zeros((0, 3)), np.int32).reshape(-1, 3)
                          if has_images else None,
                          images_per_prompt=np.asarray(batch.get("images_per_sample", np.zeros(len(batch["input_ids"]))), np.int64),
                          tokens=samples.tokens, resp_mask=mask, advantages=adv,
                          old_logp=np.asarray(samples.logprobs, np.float32) * mask, group_size=g)
        update_metrics = self._update(rollout_batch)
        t3 = time.perf_counter()

        ended = np.isin(samples.tokens[np.arange(len(samples.lengths)), np.maximum(samples.lengths - 1, 0)],
                        np.asarray(self.rollout_cfg.eos_token_ids or (-1,))) | stopped
        parts = {name: np.asarray(v) for name, v in (out.as_dict().items() if hasattr(out, "as_dict") else ())
                 if name != "reward"}
        if hasattr(out, "format"):
            parts["_format"] = np.asarray(out.format) > 0
        # Per-sample values of the whole batch (every process's, in global order, when split).
        rows = processes.gather_rows({"reward": rewards, "length": samples.lengths, "ended": ended, "zero": zero,
                                      "adv": adv,
                                  **{f"part/{k}": v for k, v in parts.items()}})
        rewards, zero, adv = rows["reward"], rows["zero"], rows["adv"]
        lengths = rows["length"].astype(np.float64)
        prompt_tokens = int(processes.sum(np.asarray([np.asarray(batch["attention_mask"]).sum()], np.int32))[0]) * g
        metrics: dict[str, Any] = {}
        metrics["reward/mean"], metrics["reward/std"] = _mean_std(rewards)
        for name in parts:
            if name != "_format":
                metrics[f"reward/{name}"] = float(np.mean(rows[f"part/{name}"]))
        if "_format" in parts:
            metrics["format_rate"] = float(np.mean(rows["part/_format"]))
        metrics.update({
            "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
            "response_length/truncated_rate": float(np.mean(~rows["ended"])),
            "groups/zero_spread_rate": float(zero.reshape(-1, g)[:, 0].mean()),
            "advantage/abs_mean": float(np.abs(adv).mean()),
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2, "time/step_s": t3 - t0,
            "throughput/rollout_tokens_per_s": float(lengths.sum()) / max(t1 - t0, 1e-9),
            "throughput/update_tokens_per_s": update_metrics.pop("processed_tokens") / max(t3 - t2, 1e-9),
            "rollout/kv_cache_mib": samples.kv_cache_bytes / 2**20, "rollout/prompt_tokens": prompt_tokens,
            # Real response tokens over the decode slots run (rows that ended wait for the longest): the
            # share of the rollout's decode work that was not padding; lengths are the whole batch's.
            "rollout/useful_slot_share": useful_slot_share(lengths, samples.decode_slots),
            "rollout/decode_slots": samples.decode_slots,
        })
        metrics.update(update_metrics)
        return metrics

    # -------------------------------------------------------------------------------------------- update

    def _micro_batches(self, rollout_batch: RolloutBatch) -> list[list[MicroBatch]]:
        """Minibatches (one optimizer update each) of micro-batches (one forward/backward each): padded
        ones of rl.micro_batch_prompts prompts, or packed ones cut by the token budget (packing.py)."""
        settings, processes = self.settings, self.processes
        # micro_batch_prompts counts prompts over all processes; each process cuts its own share.
        ranges = slices(rollout_batch.num_prompts, settings.num_minibatches,
                        settings.micro_batch_prompts // processes.count)
        if not settings.packing:
            return [[padded_micro(rollout_batch, a, b, processes.micro_inputs(rollout_batch, a, b, self.model_config))
                     for a, b in mb] for mb in ranges]
        width = rollout_batch.prompt_ids.shape[1] + rollout_batch.tokens.shape[1]
        rows = (ranges[0][0][1] - ranges[0][0][0]) * settings.group_size  # the padded micro-batch's rows
        # pack_tokens, like micro_batch_prompts, counts over all processes; each packs its own prompts on its
        # own share of the batch shards, then they agree on counts and shapes (grpo_multihost.py).
        max_rows = max(1, settings.pack_tokens // (width * processes.count)) if settings.pack_tokens > 0 else rows
        shards = batch_shard_count(self.fns.mesh, self.fns.rules) // processes.count
        return processes.agree_packed([pack_minibatch(rollout_batch, mb[0][0], mb[-1][1], self.model_config, max_rows,
                                                      shards, processes.local_inputs) for mb in ranges],
                                      rollout_batch, self.model_config)

    def _update(self, rollout_batch: RolloutBatch) -> dict[str, float]:
        settings, fns, processes = self.settings, self.fns, self.processes
        # Dr. GRPO's norm_length stays max_new_tokens when the response span is trimmed or packed.
        norm_length = jnp.float32(rollout_batch.tokens.shape[1])
        if settings.response_bucket > 0:  # every process keeps the same columns (the global longest)
            width = response_width(rollout_batch.resp_mask, settings.response_bucket)
            rollout_batch = trim_responses(rollout_batch, int(processes.max(float(width))))
        micro_batches = self._micro_batches(rollout_batch)
        micros = [micro for mb in micro_batches for micro in mb]
        # Response tokens and sequences per micro-batch, summed over processes: every process then takes
        # the same branches below (skips, updates), so the collectives inside the jitted calls line up.
        counts = processes.sum(np.asarray([(m.tokens, m.seqs) for m in micros], np.int32).reshape(len(micros), 2)
                               ).tolist()
        # Old (and reference) log-probs come from the pre-update policy, for every micro-batch first.
        diffs = []
        if settings.recompute_old_logprobs or settings.kl_coef > 0:
            for micro, (tokens, _) in zip(micros, counts):
                if tokens == 0:
                    continue
                if settings.recompute_old_logprobs:
                    fresh = processes.to_host(fns.logprobs(self.state.params, micro.inputs), micro.axis) * micro.mask
                    # The sampler's log-probs (KV-cache decode) vs a full forward: ~1e-6 in fp32; large values
                    # mean the update does not see what the sampler saw (positions, images, dtype).
                    diffs.append(float(np.abs(fresh - micro.old_logp).max()))
                    micro.inputs["old_logp"] = processes.from_host(fresh, micro.axis)
                if settings.kl_coef > 0:
                    micro.inputs["ref_logp"] = processes.from_host(
                        processes.to_host(fns.logprobs(self.ref_params, micro.inputs), micro.axis), micro.axis)
        sums: dict[str, Any] = {}
        grad_norms, skipped, empty, lrs, processed = [], 0, 0, [], 0
        first = np.cumsum([0] + [len(mb) for mb in micro_batches])
        for _ in range(settings.ppo_epochs):
            for m, mb in enumerate(micro_batches):
                mb_counts = counts[first[m]:first[m + 1]]
                tokens = sum(float(c[0]) for c in mb_counts)
                seqs = sum(float(c[1]) for c in mb_counts)
                if tokens == 0:  # every group dropped: nothing to learn from, no optimizer update
                    empty += 1
                    continue
                denoms = {"tokens": jnp.float32(tokens), "seqs": jnp.float32(seqs), "norm_length": norm_length}
                acc, loss = None, jnp.float32(0)
                for micro, c in zip(mb, mb_counts):
                    if c[0] == 0:
                        continue
                    if acc is None:
                        acc = fns.zeros(self.state.params)
                    acc, part = fns.accumulate(self.state.params, acc, micro.inputs, denoms)
                    loss = loss + part["loss"]
                    sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
                    processed += micro.processed
                lrs.append(float(self.schedule(int(self.state.step))))
                self.state, applied = fns.apply(self.state, acc, loss)
                grad_norms.append(applied["grad_norm"])
                skipped += applied["skipped"]
        sums, grad_norms, skipped = jax.device_get((sums, grad_norms, skipped))
        count = max(float(sums.get("tokens", 0.0)), 1.0)
        out = {f"update/{k}": float(sums[k]) / count for k in ("clip_frac_low", "clip_frac_high", "clip_frac_dual",
                                                              "approx_kl_old", "entropy") if k in sums}
        if "kl" in sums:
            out["update/kl"] = float(sums["kl"]) / count
        if settings.recompute_old_logprobs:  # the largest gap over every process's micro-batches
            diff = processes.max(max(diffs, default=0.0))
            if diffs or processes.count > 1:
                out["rollout/logprob_diff_max"] = diff
        updates = len(grad_norms)
        out.update({"update/loss": float(sums.get("loss", 0.0)) / max(updates, 1),
                    "update/pg_loss": float(sums.get("pg_loss", 0.0)) / max(updates, 1),
                    "update/grad_norm": float(np.mean(grad_norms)) if updates else 0.0,
                    "update/lr": float(np.mean(lrs)) if lrs else 0.0, "update/updates": updates,
                    "update/skipped_nonfinite": int(skipped), "update/skipped_empty": empty,
                    "update/total_skipped_nonfinite": int(self.state.skipped),
                    "update/optimizer_steps": int(self.state.step),
                    "processed_tokens": float(processes.sum(np.asarray([processed], np.int32))[0])})
        return out
