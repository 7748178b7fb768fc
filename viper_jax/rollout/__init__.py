"""Sampling from the policy: a multimodal prefill and a KV-cache decode loop, each one jitted program.

engine.py: `generate` (B prompts on this host, G samples each), the jitted `prefill` and `decode` it runs,
`sample_next` (one decode step, which `viper plan` compiles too). global_rollout.py: the same programs
over a prompt batch split across JAX processes. sampling.py: temperature / top-k / top-p sampling.
"""

from viper_jax.rollout.engine import (RolloutConfig, RolloutResult, check_fits, decode, generate,  # noqa: F401
                                      kv_cache_bytes, left_pad, prefill, sample_next)
from viper_jax.rollout.sampling import SamplingConfig, sample  # noqa: F401
