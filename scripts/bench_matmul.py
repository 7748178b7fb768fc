"""The benchmark model's matmuls one at a time: XLA:CPU vs PyTorch (MKL) at the shapes bench_model.py runs.

Explains where bench_model.py's time goes. For every weight of one decoder layer and the lm_head, at the
benchmark's 1080 token rows: forward (x @ W), input gradient (dY @ W^T) and weight gradient (x^T @ dY),
each timed as
  - jax: one jitted dot (how the model runs it; XLA:CPU hands it to YNNPACK),
  - jax 2x: the same dot as two independent row halves in one program, which XLA's thunk executor runs
    concurrently, one per core,
  - torch: one matmul with torch's intra-op threads (MKL),
each timed call ~20 ms of the same matmul back to back after one untimed call (so both libraries'
threads are awake and the other's have stopped spinning), round-robin in a rotating order in one run
(median of --rounds). Same FLOPs in every column; GFLOP/s and the ratios printed,
then one training step's total (each shape times how often the step runs it).
`--threads 1` pins the process to one core (before JAX starts) to compare the kernels without threading.
Usage: python scripts/bench_matmul.py [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_common import bench_config_dict, time_interleaved  # noqa: E402


def shapes(rows: int) -> list[tuple[str, tuple[int, int, int], int]]:
    """(name, (m, k, n), times per training step) of the decoder's and lm_head's matmuls, forward and backward."""
    t = bench_config_dict()["text_config"]
    d, f, v, layers = t["hidden_size"], t["intermediate_size"], t["vocab_size"], t["num_hidden_layers"]
    kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
    weights = [("q/o", d, d, 2 * layers), ("k/v", d, kv, 2 * layers), ("gate/up", d, f, 2 * layers),
               ("down", f, d, layers), ("lm_head", d, v, 1)]
    out = []
    for name, din, dout, count in weights:
        out += [(f"{name} fwd", (rows, din, dout), count), (f"{name} dX", (rows, dout, din), count),
                (f"{name} dW", (din, rows, dout), count)]
    return out


def _back_to_back(f, args: tuple, reps: int):
    """`reps` calls of f(*args), each waited for and its result dropped (so its memory is reused), as a
    training step runs its matmuls: each library's threads stay awake between calls."""
    def run():
        import jax

        for _ in range(reps):
            jax.block_until_ready(f(*args))  # returns torch tensors as they are

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rows", type=int, default=1080)
    ap.add_argument("--threads", type=int, default=0, help="pin to this many cores (0: all)")
    args = ap.parse_args()
    if args.threads:
        os.sched_setaffinity(0, set(range(args.threads)))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    one = jax.jit(jnp.matmul)
    halves = jax.jit(lambda a, b: jnp.concatenate([a[: a.shape[0] // 2] @ b, a[a.shape[0] // 2:] @ b], 0))
    rng = np.random.default_rng(0)
    cases, fns, reps = shapes(args.rows), {}, {}
    for name, (m, k, n), _ in cases:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        r = reps[name] = max(3, round(0.02 / (2 * m * k * n / 150e9)))  # ~20 ms of work per timed call
        fns[name, "jax"] = _back_to_back(one, (ja, jb), r)
        fns[name, "jax 2x"] = _back_to_back(halves, (ja, jb), r)
        fns[name, "torch"] = _back_to_back(torch.matmul, (ta, tb), r)
    medians = {key: sec / reps[key[0]] for key, sec in time_interleaved(fns, args.rounds, warm_each=True).items()}

    cores = len(os.sched_getaffinity(0))
    print(f"fp32 matmuls of the bench_model config at {args.rows} rows, {cores} cores, GFLOP/s (median of "
          f"{args.rounds})")
    print(f"{'matmul':16s}{'m x k x n':>20s}{'jax':>8s}{'jax 2x':>8s}{'torch':>8s}{'jax/torch':>11s}"
          f"{'2x/torch':>10s}")
    totals = {"jax": 0.0, "jax 2x": 0.0, "torch": 0.0}
    for name, (m, k, n), count in cases:
        med = {c: medians[name, c] for c in totals}
        for c in totals:
            totals[c] += count * med[c]
        rate = {c: 2 * m * k * n / s / 1e9 for c, s in med.items()}
        print(f"{name:16s}{f'{m}x{k}x{n}':>20s}{rate['jax']:>8.0f}{rate['jax 2x']:>8.0f}{rate['torch']:>8.0f}"
              f"{rate['jax'] / rate['torch']:>10.2f}x{rate['jax 2x'] / rate['torch']:>9.2f}x")
    print(f"one training step's decoder + lm_head matmuls (each shape x its count): jax "
          f"{totals['jax'] * 1e3:.0f} ms, jax 2x {totals['jax 2x'] * 1e3:.0f} ms, torch {totals['torch'] * 1e3:.0f} ms; "
          f"speed-up of jax over torch {totals['torch'] / totals['jax']:.2f}x")


if __name__ == "__main__":
    main()
