"""ViPER's phased GRPO trainer (`viper train`). Importing this package is cheap; the trainer itself is
`viper_jax.train.trainer.train` and loads JAX, the model and the data pipeline."""
