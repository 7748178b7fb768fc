"""Rollout waste: the useful-slot share (real response tokens / decode slots run) against hand-computed
values, the shrinking decode loop (rows that ended leave the batch) against the unshrunk one, on one
device and on a batch-sharded mesh, and the trainer's metrics row carrying the share."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from viper_jax.models.qwen2_5_vl import load_hf
from viper_jax.rollout.engine import RolloutConfig, auto_shrink_rows, generate, shrink_sizes, useful_slot_share
from viper_jax.rollout.sampling import SamplingConfig
from viper_jax.tiny import write_tiny_model

NEW = 40


def reference_slots(lengths: np.ndarray, n: int, sizes: tuple[int, ...]) -> int:
    """Decode slots by hand: the first token costs every row; step t (token t, 0-based) runs while t < n
    and more rows than the next phase's size are live (a row of length L is live at step t iff L > t); the
    batch then drops to that size and the loop goes on."""
    slots, t = len(lengths), 1
    for k, size in enumerate(sizes):
        limit = sizes[k + 1] if k + 1 < len(sizes) else 0
        while t < n and int((lengths > t).sum()) > limit:
            slots += size
            t += 1
    return slots


def test_share_is_tokens_over_rows_times_steps():
    # 4 rows of lengths 3, 1, 5, 2: the loop runs 5 steps for all 4 rows = 20 slots, 11 of them real.
    assert useful_slot_share(np.asarray([3, 1, 5, 2]), 20) == pytest.approx(11 / 20)
    assert reference_slots(np.asarray([3, 1, 5, 2]), 8, (4,)) == 20
    # Shrinking to 2 rows once at most 2 are live (after step 2: lengths 3 and 5 left), then to 1 after
    # step 3: 4 + 4 (t=1) + 2 (t=2) + 1 (t=3) + 1 (t=4) = 12 slots.
    assert reference_slots(np.asarray([3, 1, 5, 2]), 8, (4, 2, 1)) == 12
    assert shrink_sizes(32, 0) == (32,)
    assert shrink_sizes(32, 1) == (32, 16, 8, 4, 2, 1)
    assert shrink_sizes(24, 4) == (24, 12)  # 6 is not a multiple of 4 (a 4-way batch mesh)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_hf(write_tiny_model(tmp_path_factory.mktemp("tiny")))


def _prompts() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(20, 200, size=(4, 10)).astype(np.int32)  # byte tokens: no image placeholders
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # one left-padded prompt
    return ids, mask


def _cfg(model, shrink_rows: int) -> RolloutConfig:
    vocab = model.config.text.vocab_size
    # A random-init policy samples near-uniformly, so ending on 1 token in 12 gives long-tailed lengths
    # (geometric, mean ~12, cut at NEW): rows end at very different steps, the case shrinking is for.
    eos = tuple(range(0, vocab, 12))
    return RolloutConfig(max_new_tokens=NEW, prompt_buckets=(16,), max_cache_len=16 + NEW, eos_token_ids=eos,
                         pad_token_id=0, group_size=4, sampling=SamplingConfig(temperature=1.0, top_p=0.95),
                         shrink_rows=shrink_rows)


def test_engine_counts_the_slots_it_ran(model):
    ids, mask = _prompts()
    for shrink in (0, 1):
        cfg = _cfg(model, shrink)
        out = generate(model, ids, mask, jax.random.key(5), cfg)
        rows = len(out.lengths)
        assert out.decode_slots == reference_slots(out.lengths, NEW, shrink_sizes(rows, shrink))
        if shrink == 0:
            assert out.decode_slots == rows * out.lengths.max()
        assert out.useful_slot_share == pytest.approx(out.lengths.sum() / out.decode_slots)


@pytest.mark.parametrize("seed", [1, 2])
def test_shrunk_decode_samples_what_the_full_batch_samples(model, seed):
    """Same seed, shrink on vs off: the same tokens and lengths (every row keeps its own random draw), log-
    probs to 1e-5 (the shrunk batch's matmuls have other shapes), and fewer slots for the same tokens."""
    ids, mask = _prompts()
    full = generate(model, ids, mask, jax.random.key(seed), _cfg(model, 0))
    shrunk = generate(model, ids, mask, jax.random.key(seed), _cfg(model, 1))
    assert len(set(full.lengths.tolist())) > 3  # the lengths really are spread
    np.testing.assert_array_equal(shrunk.tokens, full.tokens)
    np.testing.assert_array_equal(shrunk.lengths, full.lengths)
    np.testing.assert_allclose(shrunk.logprobs, full.logprobs, atol=1e-5)
    assert shrunk.decode_slots < full.decode_slots
    assert shrunk.useful_slot_share > full.useful_slot_share


def test_trainer_metrics_row_has_the_share(tmp_path, capsys):
    """One GRPO step of the tiny config (16 rows, rollout.shrink_rows auto: 16, 8, 4, 2): its metrics row
    has rollout/useful_slot_share = response tokens / decode slots, never more slots than the unshrunk
    loop's rows x longest response."""
    from grpo_tiny import tiny_config
    from viper_jax.tiny import write_tiny_records
    from viper_jax.train.trainer import train

    write_tiny_records(tmp_path / "data", per_task=4)
    config = tiny_config(tmp_path / "run", tmp_path / "data", [
        "--config.stage_order=('caption_refine',)", "--config.stages.caption_refine.steps=1",
        "--config.stages.caption_refine.reward=toy_letters", "--config.checkpoint.every_steps=100"])
    rows = config.rl.prompts_per_step * config.rl.group_size
    assert auto_shrink_rows(rows) == 2 and auto_shrink_rows(1024, 8) == 128
    train(config)
    # data.auto_buckets (on by default) chose the prompt buckets from the records (tests/test_auto_buckets.py).
    assert "prompt buckets from the data (data.auto_buckets): [192, 384]" in capsys.readouterr().out
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    share, slots = row["rollout/useful_slot_share"], row["rollout/decode_slots"]
    assert 0 < share <= 1
    assert share == pytest.approx(row["response_length/mean"] * rows / slots)
    assert slots <= rows * row["response_length/max"]


MESH_SCRIPT = """
import dataclasses, tempfile
import jax, numpy as np
from flax import nnx
from viper_jax.models.qwen2_5_vl import load_hf
from viper_jax.rollout.engine import RolloutConfig, generate
from viper_jax.rollout.sampling import SamplingConfig
from viper_jax.sharding import batch_shard_count, make_mesh, param_shardings, use_mesh
from viper_jax.tiny import write_tiny_model

assert jax.device_count() == 4
model = load_hf(write_tiny_model(tempfile.mkdtemp()))
mesh = make_mesh((4, 1, 1))
assert batch_shard_count(mesh) == 4
graphdef, state = nnx.split(model)
nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state), param_shardings(model, mesh)))
model = nnx.merge(graphdef, state)
ids = np.random.default_rng(0).integers(20, 200, size=(4, 10)).astype(np.int32)
cfg = RolloutConfig(max_new_tokens=32, prompt_buckets=(16,), max_cache_len=48, pad_token_id=0, group_size=4,
                    eos_token_ids=tuple(range(0, model.config.text.vocab_size, 10)),
                    sampling=SamplingConfig(temperature=1.0))
with use_mesh(mesh):
    a, b = (generate(model, ids, None, jax.random.key(3), dataclasses.replace(cfg, shrink_rows=k)) for k in (0, 4))
np.testing.assert_array_equal(a.tokens, b.tokens)
np.testing.assert_array_equal(a.lengths, b.lengths)
np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
assert b.decode_slots < a.decode_slots, (a.decode_slots, b.decode_slots)
print("OK")
"""


def test_shrinking_on_a_batch_sharded_mesh(tmp_path):
    """4 host devices, rows split 4 ways (data=4): the shrunk batches (16, 8, 4 rows) stay multiples of the
    mesh's batch shards and sample what the whole batch samples. In a subprocess: the device count must be
    set before JAX starts."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
