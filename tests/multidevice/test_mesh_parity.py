"""On 8 devices: the sharded tiny model gives the single-device logits and gradients for every mesh,
each parameter's shards have the shape the rules say, and bad meshes/rules fail before any compile."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from sharded_tiny import abstract_model, forward_backward, tiny_config
from viper_jax.sharding import DEFAULT_RULES, logical_to_spec, make_mesh, param_shardings, rules_from_config

TOL = 1e-5  # fp32: only the order of reductions differs between layouts
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]
# Written out by hand, independently of sharding.py: q_proj.kernel is [layers 2, embed 128, heads 16 x 8],
# embed -> fsdp, heads -> tensor.
Q_PROJ_SHARD = {(8, 1, 1): (2, 128, 128), (1, 8, 1): (2, 16, 128), (1, 1, 8): (2, 128, 16),
                (2, 2, 2): (2, 64, 64), (1, 2, 4): (2, 64, 32)}
# The default rules for parameters, as a plain table: logical name -> mesh axes.
PARAM_AXES = {"embed": ("fsdp",), "mlp": ("tensor",), "heads": ("tensor",), "kv_heads": ("tensor",),
              "vocab": ("tensor",)}


def _expected_shard(shape: tuple[int, ...], names: tuple, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(d // math.prod(sizes[a] for a in PARAM_AXES.get(n, ())) for d, n in zip(shape, names))


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_logits_and_grads_match_one_device(tiny, reference, sizes):
    cfg, graphdef, params, batch = tiny
    ref_loss, ref_logits, ref_grads = reference
    mesh = make_mesh(sizes)
    abstract = abstract_model(cfg)
    p_sh = param_shardings(abstract, mesh)
    placed = jax.device_put(params, p_sh)

    # Each parameter's shards: the shape the rules table says, on every device.
    axis_sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    names = jax.tree.leaves(jax.tree.map(tuple, _logical_names(abstract), is_leaf=lambda x: isinstance(x, tuple)),
                            is_leaf=lambda x: isinstance(x, tuple))
    for (path, arr), nm in zip(jax.tree_util.tree_leaves_with_path(placed), names):
        want = _expected_shard(arr.shape, nm, axis_sizes)
        got = {s.data.shape for s in arr.addressable_shards}
        assert got == {want}, (jax.tree_util.keystr(path), nm, got, want)
        assert len(arr.addressable_shards) == 8
    q = placed["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == Q_PROJ_SHARD[sizes]

    loss, logits, grads = forward_backward(graphdef, placed, batch, mesh, p_sh)
    # The activation constraints are active: logits come out split over batch and vocabulary.
    want_logits = NamedSharding(mesh, logical_to_spec(("batch", "length", "vocab")))
    assert logits.sharding.is_equivalent_to(want_logits, 3), logits.sharding
    np.testing.assert_allclose(float(loss), ref_loss, rtol=TOL)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=TOL, atol=TOL)
    worst = 0.0
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(grads)), jax.tree.leaves(ref_grads)):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=TOL, atol=TOL, err_msg=jax.tree_util.keystr(path))
        worst = max(worst, float(np.abs(g - r).max()))
    print(f"mesh {sizes}: |dlogits| {np.abs(np.asarray(logits) - ref_logits).max():.1e}, |dgrad| {worst:.1e}")


def _logical_names(abstract):
    from flax import nnx
    return nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))


def test_mesh_that_does_not_divide_the_devices():
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        make_mesh((3, -1, 1))
    with pytest.raises(ValueError, match="needs 16 devices, 8 are present"):
        make_mesh((2, 2, 4))


def test_heads_that_do_not_divide_the_tensor_axis(compiles):
    """The standard tiny config (4 heads, 2 KV heads): tensor=8 would split heads; refused up front."""
    standard = abstract_model(tiny_config(num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                          mrope_section=(2, 3, 3)))
    mesh = make_mesh((1, 1, 8))
    with pytest.raises(ValueError, match=r"text attention heads: 4 heads do not divide over mesh axis tensor of size 8"):
        param_shardings(standard, mesh)
    # Replicating attention over `tensor` (the MLP and vocabulary stay split) is the documented way out.
    rules = rules_from_config([["heads", None], ["kv_heads", None]])
    shardings = param_shardings(standard, mesh, rules)
    assert shardings["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].spec[2] == "tensor"
    assert compiles == []


def test_dimension_not_divisible_names_parameter_dimension_and_axis(compiles):
    odd = abstract_model(tiny_config(intermediate_size=100))
    with pytest.raises(ValueError, match=r"parameter language_model\.layers\.mlp\.(down|gate|up)_proj\.kernel: "
                                         r"dimension \d of size 100 is sharded over mesh axis tensor of size 8"):
        param_shardings(odd, make_mesh((1, 1, 8)))
    # fsdp over 8 is fine for the same model (no `mlp` split).
    param_shardings(odd, make_mesh((1, 8, 1)), DEFAULT_RULES)
    assert compiles == []
