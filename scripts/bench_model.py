"""Forward + backward tokens/s: the Flax model vs transformers (PyTorch eager and sdpa), same ~30M model.

Batch 4, ~270 tokens per row with one 112x112 image, next-token cross-entropy, fp32, this machine's CPU.
viper_jax runs twice: layers under lax.scan (the default, what real models use) and unrolled over
per-layer modules (`scan_layers=False`). Also prints the model's achieved FLOP/s (analytic FLOPs of the step) as a
fraction of a 2048^3 matmul measured in the same run. One run, the contenders timed round-robin in a
rotating order (median of --steps rounds); prints the ratios.

By default the process first makes glibc keep freed memory (viper_jax.host_memory), which spares
XLA:CPU's per-step temporaries (and PyTorch's large tensors) from being mapped and faulted in again
every step; `--malloc default` leaves glibc as it is, to see the difference.
Usage: python scripts/bench_model.py [--steps 9] [--remat dots] [--malloc default]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from bench_common import (add_malloc_arg, apply_malloc, bench_config_dict, build_models,  # noqa: E402
                          describe_machine, image_batch, matmul_flops_per_second, time_interleaved, train_flops)
from viper_jax.models.qwen2_5_vl import get_rope_index, load_hf, prepare_vision  # noqa: E402
from viper_jax.rl.grpo_loss import token_logprobs  # noqa: E402


def _jax_step(model, batch):
    graphdef, params = nnx.split(model, nnx.Param)
    positions, _ = get_rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], None, None,
                                  model.config)
    vision = prepare_vision(batch["image_grid_thw"], model.config.vision)
    ids, pix = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"])

    def loss_fn(params):  # the trainer's path: lm_head over the predicting positions, token_logprobs
        m = nnx.merge(graphdef, params)
        hidden = m.hidden_states(ids, pixel_values=pix, position_ids=positions, vision_inputs=vision)
        return -token_logprobs(m.logits_from_hidden(hidden[:, :-1]), ids[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    return lambda: jax.block_until_ready(step(params))


def _torch_step(model, batch):
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    ids = inputs["input_ids"]

    def run():
        model.zero_grad(set_to_none=True)
        model.model.rope_deltas = None
        hidden = model.model(**inputs).last_hidden_state
        logits = model.lm_head(hidden[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text_tokens", type=int, default=252)
    ap.add_argument("--remat", default="none", help="viper_jax's remat policy: none | dots | full")
    add_malloc_arg(ap)
    args = ap.parse_args()
    apply_malloc(args.malloc)

    batch = image_batch(args.batch, args.text_tokens)
    tokens = batch["input_ids"].size
    hf_eager, path = build_models("eager")
    ours = load_hf(path, remat=args.remat)
    ours_unrolled = load_hf(path, scan_layers=False, remat=args.remat)
    hf_sdpa, _ = build_models("sdpa")
    hf_sdpa.load_state_dict(hf_eager.state_dict())
    hf_eager.train(), hf_sdpa.train()

    jax_step = _jax_step(ours, batch)
    grid = int(batch["image_grid_thw"][0, 1])
    flops = train_flops(bench_config_dict(), args.batch, batch["input_ids"].shape[1], grid * grid)
    faults = {}
    results = time_interleaved({"viper_jax (jit)": jax_step,
                                 "viper_jax (jit, unrolled)": _jax_step(ours_unrolled, batch),
                                 "transformers eager": _torch_step(hf_eager, batch),
                                 "transformers sdpa": _torch_step(hf_sdpa, batch)}, args.steps, faults=faults)
    jax_mm, torch_mm = matmul_flops_per_second()

    print(f"machine: {describe_machine()}; batch {args.batch} x {batch['input_ids'].shape[1]} tokens "
          f"(one 112x112 image per row), fp32, forward + backward, viper_jax remat={args.remat}, "
          f"malloc {args.malloc}")
    print(f"{'':26s}{'s/step':>10s}{'tokens/s':>12s}{'vs ours':>10s}{'page faults/step':>18s}")
    for name, sec in results.items():
        print(f"{name:26s}{sec:>10.3f}{tokens / sec:>12.0f}{results['viper_jax (jit)'] / sec:>9.2f}x"
              f"{faults[name]:>18.0f}")
    for ours_name in ("viper_jax (jit)", "viper_jax (jit, unrolled)"):
        for name in ("transformers eager", "transformers sdpa"):
            print(f"speed-up of {ours_name} over {name}: {results[name] / results[ours_name]:.2f}x")
    achieved = flops / min(results["viper_jax (jit)"], results["viper_jax (jit, unrolled)"])
    print(f"model FLOPs/step (analytic, fwd+bwd): {flops / 1e9:.2f} GFLOP; achieved (faster viper_jax) "
          f"{achieved / 1e9:.1f} GFLOP/s")
    print(f"2048^3 matmul: JAX {jax_mm / 1e9:.1f} GFLOP/s, torch {torch_mm / 1e9:.1f} GFLOP/s; "
          f"model at {achieved / jax_mm:.0%} of the JAX matmul rate")


if __name__ == "__main__":
    main()
