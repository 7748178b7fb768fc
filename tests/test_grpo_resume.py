"""Exact resume: `viper train` killed with SIGKILL after a checkpoint and restarted ends with parameters
and optimizer state bitwise-equal to an uninterrupted run, having trained on the same records at every
step (across the stage boundary); the checkpoint also restores onto a different mesh, unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from grpo_tiny import (ROOT, assert_bitwise_equal, committed, kill_after_checkpoint, raw_checkpoint,
                       subprocess_env, train_command)
from viper_jax.tiny import write_tiny_records

RUN = ["--config.stages.caption_refine.steps=3", "--config.stages.visual_ops.steps=2",
       "--config.checkpoint.every_steps=2", "--config.stages.caption_refine.reward=toy_letters",
       "--config.stages.visual_ops.reward=toy_letters", "--config.optim.learning_rate=3e-2"]
FINAL = 5


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# Restores the final checkpoint onto a (1, 2, 1) mesh of two CPU devices through the trainer's own
# restore path and prints a digest of every leaf.
_RESTORE_2DEV = """
import hashlib, json, sys
import jax, numpy as np
from flax import nnx
from viper_jax.checkpoint import TrainCheckpointer
from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from viper_jax.sharding import make_mesh, param_shardings
from viper_jax.train.config import load_config
from viper_jax.train.optim import make_optimizer
from viper_jax.train.resume import restore_train_state
from viper_jax.train.state import train_state_shardings
workdir, step = sys.argv[1], int(sys.argv[2])
ckpt = TrainCheckpointer(workdir + "/checkpoints", keep=3)
cfg = Qwen2_5_VLConfig.from_hf_dict(ckpt.restore_json(step))
abstract = nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))
mesh = make_mesh((1, 2, 1))
p_sh = param_shardings(abstract, mesh)
optimizer, _ = make_optimizer(load_config("configs/tiny.py").optim, 10)
shardings = train_state_shardings(optimizer, nnx.to_pure_dict(nnx.state(abstract)), p_sh)
state, meta, _ = restore_train_state(ckpt, step, optimizer, nnx.to_pure_dict(nnx.state(abstract)), shardings)
split = sum(len(x.sharding.device_set) == 2 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
digest = lambda tree: [hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest() for x in jax.tree.leaves(tree)]
print(json.dumps({"split": split, "params": digest(state.params), "opt_state": digest(state.opt_state)}))
"""


def test_sigkill_resume_is_bitwise_exact(tmp_path):
    write_tiny_records(tmp_path / "data", per_task=8)
    env = subprocess_env(tmp_path / "data", tmp_path / "jax_cache")
    full, killed = tmp_path / "full", tmp_path / "killed"

    subprocess.run(train_command(full, RUN), env=env, check=True, cwd=ROOT, capture_output=True, timeout=600)

    kill_after_checkpoint(train_command(killed, RUN), env, killed, 2)
    assert not committed(killed, FINAL)
    seen_before_kill = {r["step"]: r["record_ids"] for r in _metrics(killed)}

    out = subprocess.run(train_command(killed, RUN), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout + out.stderr

    a, b = raw_checkpoint(full, FINAL), raw_checkpoint(killed, FINAL)
    assert a["train_meta"] == b["train_meta"]
    assert_bitwise_equal(a, b)

    full_rows, resumed_rows = _metrics(full), _metrics(killed)
    assert [r["step"] for r in resumed_rows] == list(range(1, FINAL + 1))  # each step once after the resume
    for ra, rb in zip(full_rows, resumed_rows):
        assert ra["record_ids"] == rb["record_ids"] and ra["stage"] == rb["stage"], ra["step"]
        assert ra["reward/mean"] == rb["reward/mean"], ra["step"]
    for step, ids in seen_before_kill.items():
        assert ids == full_rows[step - 1]["record_ids"]

    # A different mesh: two devices, parameters split over fsdp; values identical.
    import hashlib

    env2 = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", _RESTORE_2DEV, str(full), str(FINAL)], env=env2, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(out.stdout.strip().splitlines()[-1])
    assert two["split"] > 0
    digest = lambda tree: [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in jax.tree.leaves(tree)]
    assert two["params"] == digest(a["params"])
    assert two["opt_state"] == digest(a["opt_state"])
