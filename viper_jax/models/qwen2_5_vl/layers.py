"""Building blocks shared by the vision tower and the decoder.

Every parameter is an `nnx.Param` carrying logical axis names in its `out_sharding` metadata, with
`eager_sharding=False`: flax 0.12 would otherwise try to shard the value when it is created, which
fails outside a mesh. So models build on one device with no mesh, and
`nnx.get_partition_spec(nnx.state(model))` still returns the logical names for the sharding rules.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Names = Sequence[str | None]


def param(value: jax.Array, names: Names) -> nnx.Param:
    """A parameter annotated with logical axis names (see module docstring)."""
    if len(names) != value.ndim:
        raise ValueError(f"{len(names)} logical names {tuple(names)} for a rank-{value.ndim} parameter")
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel + bias, with kernel [in, *out] (out may be several axes, e.g. a fused qkv [D, 3, D])."""

    def __init__(self, in_features: int, out_shape: int | tuple[int, ...], names: Names, *, bias: bool,
                 bias_names: Names | None = None, std: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.kernel = param(std * jax.random.normal(rngs.params(), (in_features, *out_shape), param_dtype), names)
        self.bias = param(jnp.zeros(out_shape, param_dtype), bias_names or names[1:]) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(self.dtype)
        # One 2D matmul over the flattened leading axes: a [B, T, D] tensordot makes XLA:CPU transpose
        # the output gradient before the weight-gradient matmul (a copy per layer, ~35% slower MLP backward).
        y = (x.astype(self.dtype).reshape(-1, x.shape[-1]) @ k.reshape(k.shape[0], -1))
        y = y.reshape(*x.shape[:-1], *k.shape[1:])
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """HF's Qwen2RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any):
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * h.astype(x.dtype)


class GatedMLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); biases in the vision tower, none in the decoder."""

    def __init__(self, dim: int, hidden: int, act: str, *, bias: bool, std: float, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        kw = dict(bias=bias, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(dim, hidden, ("embed", "mlp"), **kw)
        self.up_proj = Linear(dim, hidden, ("embed", "mlp"), **kw)
        self.down_proj = Linear(hidden, dim, ("mlp", "embed"), **kw)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """transformers' ACT2FN for the names Qwen configs use ("gelu" is the exact erf form there)."""
    table = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
             "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True), "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}
    if name not in table:
        raise NotImplementedError(f"activation {name!r} is not supported; known: {sorted(table)}")
    return table[name]


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def remat_policy(remat: str) -> Callable[[Callable], Callable]:
    """Wraps a scanned layer body for rematerialisation: none | full | dots (keep non-batched matmuls) |
    offload (the same matmul outputs, moved to pinned host memory between forward and backward).

    On CPU, "dots" only pays when glibc returns XLA's per-step temporaries to the kernel: it shrinks
    that block (72k vs 183k page faults, 1.47 vs 1.62 s per step in bench_model.py). With the memory
    kept (host_memory.py) "none" is faster: 1.36 s vs 1.42 s."""
    if remat == "none":
        return lambda f: f
    if remat == "full":
        return lambda f: jax.checkpoint(f, prevent_cse=False)
    if remat == "dots":
        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        return lambda f: jax.checkpoint(f, policy=policy, prevent_cse=False)
    if remat == "offload":
        policy = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
        return lambda f: jax.checkpoint(f, policy=policy, prevent_cse=False)
    raise ValueError(f"remat must be 'none', 'full', 'dots' or 'offload', got {remat!r}")


def stacked(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs, stack: bool = True
            ) -> nnx.Module | nnx.List:
    """`n` copies of a module. stack=True: one module whose parameters are stacked on a leading axis named
    'layers', for `lax.scan`. stack=False: an `nnx.List` of `n` separate modules (parameter paths
    `layers.<i>.*`, no layer axis), for an unrolled loop that reads each layer's weights in place."""
    if not stack:
        return nnx.List([make(rngs) for _ in range(n)])

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return build(rngs)


def scan_layers(layers: nnx.Module | nnx.List, body: Callable, carry: Any, xs: Any, remat: str) -> tuple[Any, Any]:
    """Runs `body(layer, carry, x) -> (carry, y)` over the layers that `stacked` built.

    Stacked: one `lax.scan`, so the compiled program holds one layer however deep the model is (the
    choice for real models on TPU/GPU). An `nnx.List`: a Python loop, as MaxText's `scan_layers=False`:
    compile time grows with depth, but a step neither slices each layer's weights out of the stacks
    (a copy of every weight per step) nor stacks its saved activations and gradients. CPU benchmark
    model (`scripts/bench_model.py`): 1.25 s per training step vs 1.36 s scanned (1.58 vs 1.80 s when
    glibc returns freed memory to the kernel: 140k vs 181k page faults, see host_memory.py).
    """
    if isinstance(layers, nnx.List):
        ys = []
        for i, layer in enumerate(layers):
            graphdef, state = nnx.split(layer)
            run = remat_policy(remat)(lambda c, state, x, g=graphdef: body(nnx.merge(g, state), c, x))
            carry, y = run(carry, state, None if xs is None else jax.tree.map(lambda a: a[i], xs))
            ys.append(y)
        return carry, None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys)
    graphdef, state = nnx.split(layers)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    return jax.lax.scan(remat_policy(remat)(step), carry, (state, xs))
