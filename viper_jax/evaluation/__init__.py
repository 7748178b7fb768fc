"""Benchmark evaluation (`viper eval`): VLMEvalKit-style TSVs, answer extraction and scoring, batched
greedy generation through the JAX rollout engine. `tsv` and `answers` import neither jax nor torch."""
