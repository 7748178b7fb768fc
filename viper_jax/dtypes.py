"""The dtypes a config or command line may name (compute and parameter dtype, KV cache), in one place.
Importing this module is light (no JAX until a name is looked up), so argument parsers can offer the names."""

from __future__ import annotations

from typing import Any

DTYPE_NAMES = ("float32", "bfloat16")


def dtype_named(name: str) -> Any:
    """The JAX dtype of a name in DTYPE_NAMES; any other name is refused, naming the choices."""
    import jax.numpy as jnp

    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose from {DTYPE_NAMES}")
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
