"""Seconds per GRPO step and its split (rollout / reward / update) on the ~30M-parameter benchmark model.

8 prompts (one 112x112 image + 48 text tokens each) x group 4, 64 new tokens (end tokens disabled, so
every step generates exactly 8 x 4 x 64 tokens), temperature 1; the real ViPER reward (all-MiniLM-L6-v2)
on the responses mapped to printable text; one AdamW update per step over all 32 responses. The step is
`GRPOLearner.step`, the code `viper train` runs. The first step (compilation) is reported separately.
Update MFU: analytic FLOPs (bench_common.train_flops, vision once per prompt) / update seconds, against
a matmul measured in the same run on CPU, against the device's peak given with --peak_tflops otherwise.

By default glibc keeps freed memory (viper_jax.host_memory; `--malloc default` to compare).

Usage: python scripts/bench_grpo.py [--prompts 8 --group 4 --new 64 --steps 3 --minibatches 1 --dtype float32]

--realistic: lengths as at ViPER's scale instead of every row full. Prompts of varied length (one 112x112 image
and 16 to 2 x --text_tokens text tokens each, left-padded to a 256 bucket); responses drawn long-tailed
(exponential, mean a quarter of --new, clipped to [1, --new]: the rollout generates --new tokens and each row is
cut to its drawn length, end token at its end). The same batches and lengths go through each --modes learner,
from the same initial parameters: `padded` (today's update: every row prompt bucket + --new), `trimmed`
(rl.response_bucket=32: the response span cut to the batch's longest) and `packed` (rl.packing, plus trimming).
The modes run interleaved step by step (a shared machine's load drifts). It prints useful tokens/s (real prompt
+ response tokens of the update / update seconds, compiles excluded: a new row count or trimmed width compiles
anew in a steady step) side by side, and the first step's seconds (compiles) in their own columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_common import (EOS, PAD, add_malloc_arg, apply_malloc, bench_config_dict, build_models,  # noqa: E402
                          describe_machine, image_batch, matmul_flops_per_second, train_flops)
from viper_jax.dtypes import dtype_named  # noqa: E402
from viper_jax.models.qwen2_5_vl import load_hf  # noqa: E402
from viper_jax.rl.reward import ViperReward  # noqa: E402
from viper_jax.rollout.engine import RolloutConfig  # noqa: E402
from viper_jax.rollout.sampling import SamplingConfig  # noqa: E402
from viper_jax.sharding import make_mesh, param_shardings  # noqa: E402
from viper_jax.train.config import base_config  # noqa: E402
from viper_jax.train.grpo_multihost import SingleProcess  # noqa: E402
from viper_jax.train.grpo_step import GRPOLearner, GRPOSettings, UpdateFns  # noqa: E402
from viper_jax.train.optim import make_optimizer  # noqa: E402
from viper_jax.train.state import init_train_state, train_state_shardings  # noqa: E402

BUCKET = 128
PHASES = ("time/rollout_s", "time/reward_s", "time/update_s", "time/step_s")


def prompt_batch(prompts: int, text_tokens: int, seed: int) -> dict:
    """image_batch from bench_common, left-padded to the bucket, plus what the data pipeline adds."""
    b = image_batch(prompts, text_tokens, seed=seed)
    ids, mask = b["input_ids"].astype(np.int32), b["attention_mask"].astype(np.int32)
    pad = BUCKET - ids.shape[1]
    return dict(input_ids=np.pad(ids, ((0, 0), (pad, 0)), constant_values=PAD), attention_mask=np.pad(mask, ((0, 0), (pad, 0))),
                pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"].astype(np.int32),
                num_patches=np.asarray(len(b["pixel_values"])), images_per_sample=np.ones(prompts, np.int32),
                truth=[("The ellipse is red.", "A tree stands on the left.")] * prompts,
                id=[f"bench-{seed}-{i}" for i in range(prompts)])


def varied_prompt_batch(prompts: int, max_text: int, seed: int, bucket: int) -> dict:
    """prompt_batch's layout with 16 .. max_text text tokens per prompt (one image each), left-padded to `bucket`."""
    rng = np.random.default_rng(seed)
    rows = [image_batch(1, int(rng.integers(16, max_text + 1)), seed=seed * 1000 + i) for i in range(prompts)]
    ids = np.full((prompts, bucket), PAD, np.int32)
    for i, r in enumerate(rows):
        ids[i, bucket - r["input_ids"].shape[1]:] = r["input_ids"][0]
    b = prompt_batch(prompts, 16, seed)
    b.update(input_ids=ids, attention_mask=(ids != PAD).astype(np.int32),
             pixel_values=np.concatenate([r["pixel_values"] for r in rows]),
             image_grid_thw=np.concatenate([r["image_grid_thw"] for r in rows]).astype(np.int32))
    return b


class LongTailLengths(SingleProcess):
    """The rollout as it is, then each response cut to a long-tailed length (exponential, mean cap / 4, in
    [1, cap]) ending in an end token: the lengths of a real policy, which a random benchmark model does not
    produce. Draws are seeded by the step, so every learner sees the same lengths."""

    def __init__(self, cap: int):
        self.cap, self.step = cap, 0

    def rollout(self, model, batch, pixels, rng, cfg):
        samples, ids, mask, has_images = super().rollout(model, batch, pixels, rng, cfg)
        draw = np.random.default_rng(self.step)
        self.step += 1
        rows = len(samples.lengths)
        lengths = np.clip(np.ceil(draw.exponential(self.cap / 4, rows)), 1, self.cap).astype(samples.lengths.dtype)
        keep = np.arange(samples.tokens.shape[1])[None] < lengths[:, None]
        tokens = np.where(keep, samples.tokens, PAD)
        tokens[np.arange(rows), lengths - 1] = EOS
        return dataclasses.replace(samples, tokens=tokens, lengths=lengths, logprobs=samples.logprobs * keep), \
            ids, mask, has_images


MODES = {"padded": {}, "trimmed": dict(response_bucket=32), "packed": dict(packing=True, response_bucket=32)}


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (its monitoring events), so steady steps can be
    timed without the programs a new shape (row count, trimmed width) compiles."""

    def __init__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event: str, duration: float, **_: object) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration


def timed_update(learner: GRPOLearner, clock: CompileClock) -> list[float]:
    """Wraps learner._update; the returned list gets each update's compile seconds."""
    compiles, update = [], learner._update

    def wrapped(batch):
        before = clock.seconds
        out = update(batch)
        compiles.append(clock.seconds - before)
        return out

    learner._update = wrapped
    return compiles


def realistic(args, graphdef, params, optimizer, schedule, shardings, mesh, config, reward) -> None:
    """--realistic: each mode's learner over the same batches, the modes interleaved step by step (the
    machine's load drifts; interleaving spreads it over all modes alike); one table."""
    bucket, rows, clock = 256, args.prompts * args.group, CompileClock()
    rollout = RolloutConfig(max_new_tokens=args.new, prompt_buckets=(bucket,), max_cache_len=bucket + args.new,
                            eos_token_ids=(), pad_token_id=PAD, group_size=args.group,
                            sampling=SamplingConfig(temperature=1.0))
    learners, compiles, results = {}, {}, {}
    for mode in args.modes.split(","):
        settings = dataclasses.replace(GRPOSettings.from_config(config.rl, 1.0), **MODES[mode])
        # A copy per learner: its updates donate (free) the state's buffers.
        state = init_train_state(jax.tree.map(jnp.copy, params), optimizer, shardings, donate=False)
        learners[mode] = GRPOLearner(graphdef, state, UpdateFns(graphdef, optimizer, shardings, settings, mesh),
                                     settings, rollout, decode, schedule, nnx.merge(graphdef, state.params).config,
                                     processes=LongTailLengths(args.new))
        compiles[mode], results[mode] = timed_update(learners[mode], clock), []
    for s in range(args.steps + 1):
        for mode, learner in learners.items():
            t = time.perf_counter()
            m = learner.step(varied_prompt_batch(args.prompts, 2 * args.text_tokens, s, bucket), jax.random.key(s),
                             reward)
            m["wall_s"] = time.perf_counter() - t
            m["useful"] = m["rollout/prompt_tokens"] + m["response_length/mean"] * rows
            m["compile_s"] = compiles[mode][-1]
            results[mode].append(m)
    first = next(iter(results.values()))
    print(f"machine: {describe_machine()}, malloc {args.malloc}")
    print(f"workload: {args.prompts} prompts x group {args.group}, prompts of "
          f"{first[0]['rollout/prompt_tokens'] / rows:.0f} real tokens on average in a {bucket} bucket, "
          f"responses capped at {args.new}: mean "
          f"{np.mean([m['response_length/mean'] for m in first]):.1f} tokens, {args.steps} steady steps + the first, "
          f"compute {args.dtype}; update seconds exclude compiles (a new row count or width compiles anew)")
    head = ("mode", "first step s", "first update s", "update s", "useful tok/s", "slot tok/s", "vs padded",
            "steady compiles s", "entropy step 0")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    base = None
    for mode, steps in results.items():
        steady = steps[1:]
        seconds = [m["time/update_s"] - m["compile_s"] for m in steady]
        useful = float(np.sum([m["useful"] for m in steady])) / float(np.sum(seconds))
        slots = float(np.mean([m["throughput/update_tokens_per_s"] * m["time/update_s"] / s
                               for m, s in zip(steady, seconds)]))
        base = base or useful
        print(f"| {mode} | {steps[0]['wall_s']:.1f} | {steps[0]['time/update_s']:.1f} | {np.mean(seconds):.2f} | "
              f"{useful:.0f} | {slots:.0f} | {useful / base:.2f}x | {sum(m['compile_s'] for m in steady):.1f} | "
              f"{steps[0]['update/entropy']:.6f} |")


def decode(tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    """The benchmark vocabulary has no tokenizer: map ids onto printable ASCII, a few spaces and periods."""
    table = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz .  ,ABCDEFGH", np.uint8)
    return [table[row[:n] % len(table)].tobytes().decode() for row, n in zip(tokens, lengths)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--text_tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (accelerators)")
    ap.add_argument("--realistic", action="store_true", help="varied prompts, long-tailed responses (docstring)")
    ap.add_argument("--modes", default="padded,trimmed,packed", help="--realistic: learners to compare")
    add_malloc_arg(ap)
    args = ap.parse_args()
    apply_malloc(args.malloc)

    _, path = build_models()
    dtype = dtype_named(args.dtype)
    model = load_hf(path, dtype=dtype, param_dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    config = base_config()
    config.rl.group_size, config.rl.prompts_per_step, config.rl.num_minibatches = args.group, args.prompts, args.minibatches
    mesh = make_mesh((1, -1, 1))
    optimizer, schedule = make_optimizer(config.optim, 1000)
    shardings = train_state_shardings(optimizer, nnx.to_pure_dict(state), param_shardings(model, mesh))
    train_state = init_train_state(nnx.to_pure_dict(state), optimizer, shardings)
    del model, state
    if args.realistic:
        realistic(args, graphdef, train_state.params, optimizer, schedule, shardings, mesh, config, ViperReward())
        return
    settings = GRPOSettings.from_config(config.rl, 1.0)
    rollout = RolloutConfig(max_new_tokens=args.new, prompt_buckets=(BUCKET,), max_cache_len=BUCKET + args.new,
                            eos_token_ids=(), pad_token_id=PAD, group_size=args.group,
                            sampling=SamplingConfig(temperature=1.0))
    learner = GRPOLearner(graphdef, train_state, UpdateFns(graphdef, optimizer, shardings, settings, mesh), settings,
                          rollout, decode, schedule, nnx.merge(graphdef, train_state.params).config)
    reward = ViperReward()

    t = time.perf_counter()
    first = learner.step(prompt_batch(args.prompts, args.text_tokens, 0), jax.random.key(0), reward)
    first_s = time.perf_counter() - t
    runs = [learner.step(prompt_batch(args.prompts, args.text_tokens, s), jax.random.key(s), reward)
            for s in range(1, args.steps + 1)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if isinstance(runs[0][k], (int, float))}

    rows = args.prompts * args.group
    # Every response is trained on once per step, whatever the minibatch split; vision runs once per prompt.
    flops = train_flops(bench_config_dict(), rows, BUCKET + args.new, 64 // args.group)
    n_params = sum(x.size for x in jax.tree.leaves(learner.state.params))
    print(f"machine: {describe_machine()}, malloc {args.malloc}")
    print(f"workload: {args.prompts} prompts x group {args.group}, {args.new} new tokens, prompt bucket {BUCKET} "
          f"(one 112x112 image), {args.minibatches} update(s) per step, compute {args.dtype}, "
          f"{n_params / 1e6:.1f}M params")
    print(f"first step (compiles): {first_s:.1f} s (rollout {first['time/rollout_s']:.1f}, update {first['time/update_s']:.1f})")
    print(f"{'steady step, mean of ' + str(args.steps):28s}{'seconds':>10s}{'share':>8s}")
    for k in PHASES:
        share = mean[k] / mean["time/step_s"] * 100
        print(f"  {k.split('/')[1][:-2]:26s}{mean[k]:>10.2f}{share:>7.0f}%")
    print(f"rollout: {mean['throughput/rollout_tokens_per_s']:.0f} generated tokens/s "
          f"({rows * args.new} tokens, KV cache {runs[-1]['rollout/kv_cache_mib']:.1f} MiB)")
    achieved = flops / mean["time/update_s"]
    if jax.devices()[0].platform == "cpu":
        mm, _ = matmul_flops_per_second()
        print(f"update: {mean['throughput/update_tokens_per_s']:.0f} tokens/s, {achieved / 1e9:.1f} GFLOP/s "
              f"(analytic) = {achieved / mm:.0%} of a 2048^3 fp32 matmul measured now ({mm / 1e9:.0f} GFLOP/s)")
    else:
        mfu = f", MFU {achieved / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else " (pass --peak_tflops for MFU)"
        print(f"update: {mean['throughput/update_tokens_per_s']:.0f} tokens/s, {achieved / 1e12:.2f} TFLOP/s{mfu}")
    print(f"reward mean {mean['reward/mean']:.3f}, grad norm {mean['update/grad_norm']:.3g} (random text rarely scores "
          f"under the ViPER reward; the update computes the same whatever the advantages)")


if __name__ == "__main__":
    main()
