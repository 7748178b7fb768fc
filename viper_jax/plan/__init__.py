"""`viper plan`: will a training config fit a TPU pod slice, and how fast could it run? Answered on this
machine, without the pod.

With `libtpu` installed (the `tpu` extra), `jax.experimental.topologies.get_topology_desc` describes the
chips of a TPU slice that is not present; a mesh over those abstract devices plus
`jax.jit(f).lower(abstract inputs).compile()` runs the real TPU compiler. Nothing is allocated: the
parameters come from `nnx.eval_shape` (no weights), every input is a `jax.ShapeDtypeStruct` carrying
the sharding the trainer gives it. Compiled for the target, per program:

- update (one micro-batch forward + backward, gradients added to the donated fp32 accumulator:
  `UpdateFns.accumulate` of the GRPO trainer, the very function `viper train` runs), and the
  optimizer apply (`UpdateFns.apply`);
- rollout: the prefill of the whole prompt batch (the rollout engine's `prefill`) and one decode
  step over the batch's G samples per prompt (the engine's `sample_next`: one token through the
  layers and their caches, then sampling). The KV cache's axes are the model's own `cache_axes`.

Per chip: argument / output / temporary bytes from XLA's `memory_analysis()` (the compiler's own
buffer assignment for that chip; it refuses programs larger than HBM), plus what is resident but not
an argument (the optimizer state while the update's micro-steps and the rollout run), against the
chip's HBM.

FLOPs are analytic (`workload.py`, the matmuls and attention as this implementation runs them,
e.g. attention over all T keys, padded vision segments); XLA's `cost_analysis()` is printed beside them
but counts a scanned (while-loop) layer body once, so it is far below the true count for a scanned model.
Model FLOPs = 3 x forward for a training step; hardware FLOPs add the remat recompute. The time of a
program is a roofline lower bound, max(hardware FLOPs / peak, HBM bytes / HBM bandwidth) per chip, with
no communication time; the GRPO step time adds rollout (prefill + max_new_tokens decode steps, every
row running to the limit), old-log-prob recomputation and the update; MFU = model FLOPs / (time x peak).

Modules: chips.py (TPU chip table, abstract topologies; sets libtpu's environment), workload.py (the model
config, the shapes of one GRPO step, analytic FLOPs), packed.py (rl.packing: drawn lengths, the trainer's packed
micro-batches, splash's attention FLOPs), programs.py (`plan()`: compile and measure),
report.py (PlanReport and its text), cli.py (`viper plan` arguments; no heavy imports). This file imports
nothing, so `viper --help` stays instant.
"""
