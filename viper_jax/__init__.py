"""viper-jax: ViPER GRPO training for Qwen2.5-VL in JAX/Flax (no jax/torch imports at package import)."""
