"""One of two processes on localhost (4 CPU devices each) running one sharded forward+backward of the
tiny model on the global 8-device (2, 2, 2) mesh; process 0 also computes the single-device reference
on its own first device and writes both to an .npz for the test to compare.

Usage (by tests/test_sharding.py): python two_process_worker.py PORT PROCESS_ID OUT.npz
XLA_FLAGS must already hold --xla_force_host_platform_device_count=4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for sharded_tiny

from viper_jax import distributed  # noqa: E402


def main(port: int, process_id: int, out: str) -> None:
    distributed.initialize(f"127.0.0.1:{port}", 2, process_id, cpu_collectives="gloo", timeout_s=60)
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding

    from sharded_tiny import abstract_model, batch_shardings, forward_backward, tiny_batch, tiny_config, tiny_params
    from sharded_train_step import process_slice, shard_batch
    from viper_jax.sharding import batch_sharding, make_mesh, param_shardings

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    cfg = tiny_config()
    graphdef, params = tiny_params(cfg)  # identical on both processes (seeded NumPy)
    batch = tiny_batch(cfg)
    mesh = make_mesh((2, 2, 2))
    p_sh = param_shardings(abstract_model(cfg), mesh)
    # Each process materialises only the shards its own devices hold.
    sharded = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), params, p_sh)

    rows = process_slice(8, batch_sharding(mesh))
    b_sh = batch_shardings(mesh, batch)
    inputs = shard_batch({k: batch[k][rows] for k in ("input_ids", "attention_mask")}, mesh, global_batch=8)
    inputs["position_ids"] = jax.make_array_from_process_local_data(
        b_sh["position_ids"], batch["position_ids"][:, rows], batch["position_ids"].shape)
    for key in ("pixel_values", "vision_inputs"):  # whole-batch arrays: each process cuts its shards
        inputs[key] = jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                                   batch[key], b_sh[key], is_leaf=lambda s: isinstance(s, NamedSharding))
    loss, logits, grads = forward_backward(graphdef, sharded, inputs, mesh, p_sh)
    got = multihost_utils.process_allgather({"loss": loss, "logits": logits, "grads": grads}, tiled=True)
    if process_id == 0:
        local = jax.local_devices()[0]
        ref = forward_backward(graphdef, jax.device_put(params, local), jax.device_put(batch, local))
        ref = jax.device_get({"loss": ref[0], "logits": ref[1], "grads": ref[2]})
        flat = {}
        for tag, tree in (("got", got), ("ref", ref)):
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                flat[f"{tag}/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
        np.savez(out, rows=np.array([rows.start, rows.stop]), **flat)
    multihost_utils.sync_global_devices("done")
    print(f"process {process_id}: rows {rows.start}:{rows.stop} ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
