"""Generated tokens/s: the JAX rollout engine vs transformers' generate (PyTorch), same ~30M model.

8 prompts with one 112x112 image each x 4 samples, 128 new tokens, sampling at temperature 1 with end
tokens disabled so both sides generate exactly the same number of tokens. One run; prints the ratio.
Also prints the decode matmul floor: the weight matmuls of one step alone at the same batch, the most any
engine built on these matmuls could reach here. Usage: python scripts/bench_rollout.py [--prompts 8 --samples 4 --new 128]

--long_tail: the rollout waste instead. One token in new/4 ends a response, so the random-init policy (which
samples near-uniformly) writes geometric lengths of mean about a quarter of --new, as ViPER's are (capped at
2048, mostly a few hundred). Rows that ended keep their decode slots until the longest ends; printed beside
tokens/s: the useful-slot share (real tokens / rows x steps run), with the decode batch kept whole and with
it halving as rows end (rollout.shrink_rows: viper train's auto, and down to one row), same seed, so the same
tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from bench_common import PAD, build_models, describe_machine, image_batch  # noqa: E402
from viper_jax.models.qwen2_5_vl import load_hf  # noqa: E402
from viper_jax.rollout.engine import RolloutConfig, auto_shrink_rows, generate  # noqa: E402
from viper_jax.rollout.sampling import SamplingConfig  # noqa: E402


def decode_matmul_floor(model, rows: int, repeats: int = 20) -> float:
    """Seconds per decode step for its weight matmuls alone, in their data dependencies (q/k/v, then o;
    gate/up, then down; every layer; lm_head), one jitted program at batch `rows`: no attention, norms,
    sampling or cache writes. An engine built on these matmuls cannot take less per generated token."""
    def step(h, layers, head):
        for a, m in layers:
            q, k, v = (h @ w.kernel[...] for w in (a.q_proj, a.k_proj, a.v_proj))
            h = h + q @ a.o_proj.kernel[...] + 0.0 * (k.sum() + v.sum())  # keep k, v live
            h = h + (h @ m.gate_proj.kernel[...] * (h @ m.up_proj.kernel[...])) @ m.down_proj.kernel[...]
        return jnp.einsum("rd,vd->rv", h, head).sum()  # head [V, D], as the model holds it

    layers = [(layer.self_attn, layer.mlp) for layer in model.language_model.layer_list()]
    head = (model.lm_head.weight if hasattr(model, "lm_head") else model.language_model.embed_tokens.embedding)[...]
    h = 0.1 * jax.random.normal(jax.random.key(0), (rows, head.shape[1]))
    run = jax.jit(lambda h: step(h, layers, head))
    run(h).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        out = run(h)
    out.block_until_ready()
    return (time.perf_counter() - t) / repeats


def long_tail(args: argparse.Namespace) -> None:
    """The useful-slot share and tokens/s on long-tailed lengths, decode batch whole vs shrinking."""
    import dataclasses

    import numpy as np

    _, path = build_models("sdpa")
    ours = load_hf(path)
    batch = image_batch(args.prompts, args.text_tokens)
    vocab = ours.config.text.vocab_size
    ends = tuple(range(0, vocab, max(args.new // 4, 1)))  # P(end) per step ~ 4 / new
    base = RolloutConfig(max_new_tokens=args.new, prompt_buckets=(96, 128, 256), max_cache_len=512,
                         eos_token_ids=ends, pad_token_id=PAD, group_size=args.samples,
                         sampling=SamplingConfig(temperature=1.0))
    print(f"machine: {describe_machine()}")
    print(f"workload: {args.prompts} prompts x {args.samples} samples, up to {args.new} new tokens, end on "
          f"{len(ends)} of {vocab} tokens, prompt {batch['input_ids'].shape[1]} tokens (one 112x112 image)")
    print(f"{'decode batch':24s}{'tokens':>8s}{'mean len':>10s}{'max len':>9s}{'slots':>8s}{'useful':>8s}"
          f"{'seconds':>9s}{'tokens/s':>10s}{'1st call s':>12s}")
    results = {}
    rows = args.prompts * args.samples
    auto = auto_shrink_rows(rows)  # viper train's default: 4 batch sizes, down to rows / 8
    for name, shrink in (("whole (shrink off)", 0), (f"halving to {auto} (auto)", auto), ("halving to 1", 1)):
        cfg = dataclasses.replace(base, shrink_rows=shrink)
        run = lambda seed: generate(ours, batch["input_ids"], batch["attention_mask"], jax.random.key(seed), cfg,
                                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        t = time.perf_counter()
        run(0)  # compiles: the shrinking loop holds one decode body per batch size
        first_s = time.perf_counter() - t
        r = results[name] = run(1)
        print(f"{name:24s}{int(r.lengths.sum()):>8d}{r.lengths.mean():>10.1f}{int(r.lengths.max()):>9d}"
              f"{r.decode_slots:>8d}{r.useful_slot_share:>8.0%}{r.seconds:>9.2f}{r.tokens_per_second:>10.1f}"
              f"{first_s:>12.1f}")
    whole, *shrunk = results.values()
    same = all(np.array_equal(whole.tokens, r.tokens) and np.array_equal(whole.lengths, r.lengths) for r in shrunk)
    print(f"same tokens and lengths in all three: {same}; tokens/s vs whole: "
          + ", ".join(f"{r.tokens_per_second / whole.tokens_per_second:.2f}x" for r in shrunk))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--text_tokens", type=int, default=48)
    ap.add_argument("--long_tail", action="store_true")
    args = ap.parse_args()
    if args.long_tail:
        long_tail(args)
        return

    hf, path = build_models("sdpa")
    ours = load_hf(path)
    batch = image_batch(args.prompts, args.text_tokens)
    cfg = RolloutConfig(max_new_tokens=args.new, prompt_buckets=(96, 128, 256), max_cache_len=512,
                        eos_token_ids=(), pad_token_id=PAD, group_size=args.samples,
                        sampling=SamplingConfig(temperature=1.0))
    run = lambda seed: generate(ours, batch["input_ids"], batch["attention_mask"], jax.random.key(seed), cfg,
                                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    t = time.perf_counter()
    run(0)
    compile_s = time.perf_counter() - t
    result = run(1)
    generated = int(result.lengths.sum())
    ours_tps = generated / result.seconds

    torch.set_num_threads(torch.get_num_threads())
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        hf.model.rope_deltas = None
        t = time.perf_counter()
        out = hf.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new,
                          min_new_tokens=args.new, num_return_sequences=args.samples, pad_token_id=PAD)
        hf_s = time.perf_counter() - t
    hf_generated = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    hf_tps = hf_generated / hf_s

    print(f"machine: {describe_machine()}")
    print(f"workload: {args.prompts} prompts x {args.samples} samples, {args.new} new tokens, "
          f"prompt {batch['input_ids'].shape[1]} tokens (one 112x112 image)")
    print(f"{'':28s}{'tokens':>10s}{'seconds':>10s}{'tokens/s':>12s}")
    print(f"{'viper_jax rollout (jit)':28s}{generated:>10d}{result.seconds:>10.2f}{ours_tps:>12.1f}"
          f"   (first call incl. compile: {compile_s:.1f} s)")
    print(f"{'transformers generate':28s}{hf_generated:>10d}{hf_s:>10.2f}{hf_tps:>12.1f}")
    print(f"ratio (ours / transformers): {ours_tps / hf_tps:.2f}x")
    rows = args.prompts * args.samples
    floor_tps = rows / decode_matmul_floor(ours, rows)
    print(f"decode matmul floor (a step's weight matmuls alone, {rows} rows, no prefill): {floor_tps:.1f} "
          f"tokens/s = {floor_tps / hf_tps:.2f}x transformers; ours at {ours_tps / floor_tps:.0%} of it, "
          f"transformers at {hf_tps / floor_tps:.0%}")
    print(f"KV cache: {result.kv_cache_bytes / 2**20:.1f} MiB for {len(result.lengths)} rows; useful-slot share "
          f"{result.useful_slot_share:.0%} (no end tokens: every row runs to {args.new}; see --long_tail)")


if __name__ == "__main__":
    main()
