from viper_jax.cli import main

main()
