"""On 8 devices with fsdp=8: per-device parameter bytes, measured from the arrays' shards, and
load_hf placing a checkpoint straight into the sharded layout, reading only each device's slice."""

from __future__ import annotations

from collections import defaultdict

import jax
import numpy as np
from flax import nnx

from sharded_tiny import abstract_model
from viper_jax.models.qwen2_5_vl import load_hf, save_hf, weights
from viper_jax.sharding import make_mesh, param_shardings


def _bytes_per_device(tree) -> dict:
    out: dict = defaultdict(int)
    for arr in jax.tree.leaves(tree):
        for shard in arr.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


def test_fsdp8_per_device_parameter_bytes(tiny):
    cfg, _, params, _ = tiny
    mesh = make_mesh((1, 8, 1))
    placed = jax.device_put(params, param_shardings(abstract_model(cfg), mesh))
    leaves = jax.tree.leaves(placed)
    total = sum(a.nbytes for a in leaves)
    replicated = sum(a.nbytes for a in leaves if a.sharding.is_fully_replicated)
    per_device = _bytes_per_device(placed)
    assert len(per_device) == 8
    bound = total / 8 + replicated
    print(f"fsdp=8: total {total} B, replicated {replicated} B (norms, biases without an embed axis), "
          f"per device {sorted(set(per_device.values()))} B, bound {bound:.0f} B")
    assert max(per_device.values()) <= bound
    # Exactly the sharded part split 8 ways plus the replicated rest: nothing is stored twice on a device.
    assert set(per_device.values()) == {(total - replicated) // 8 + replicated}
    assert replicated < total / 50


def test_load_hf_straight_into_the_sharded_layout(tiny, tmp_path, monkeypatch):
    cfg, graphdef, params, _ = tiny
    save_hf(params, cfg, tmp_path)
    mesh = make_mesh((1, 8, 1))
    shardings = param_shardings(abstract_model(cfg), mesh)

    reads: list[tuple[str, int]] = []
    real_read = weights._read

    def spy(reader, entry, index, dtype):
        out = real_read(reader, entry, index, dtype)
        reads.append((entry.hf, out.nbytes))
        return out

    monkeypatch.setattr(weights, "_read", spy)
    model = load_hf(tmp_path, shardings=shardings)
    state = nnx.to_pure_dict(nnx.state(model))
    shard_bytes = {}
    for (path, arr), want, ref in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(shardings),
                                      jax.tree.leaves(params)):
        assert arr.sharding == want, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(arr), ref)
        if not want.is_fully_replicated:
            # Each device holds one 1/8 slice, and never the whole tensor.
            assert {s.data.nbytes for s in arr.addressable_shards} == {arr.nbytes // 8}
            shard_bytes[jax.tree_util.keystr(path)] = arr.nbytes // 8
    # Every host read of a sharded tensor is one device's slice (host memory stays near one slice).
    sharded_names = {e.hf.split("{")[0] for e in weights._entries(cfg)
                     if not shardings_at(shardings, e.path).is_fully_replicated}
    big = [(name, n) for name, n in reads if name.split("{")[0] in sharded_names and n > max(shard_bytes.values())]
    assert not big, big[:3]
    assert len(reads) >= 8 * len(shard_bytes)


def shardings_at(tree, path):
    for key in path:
        tree = tree[key]
    return tree
