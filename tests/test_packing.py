"""Sequence packing (rl.packing, train/packing.py) and response trimming (rl.response_bucket) against the
padded GRPO update: same loss, gradients and metrics (fp32, 1e-5) on mixed prompt and response lengths,
one- and two-image prompts, every aggregation mode, with the KL and entropy terms on."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viper_common.tiny_tokenizer import build_tiny_tokenizer
from viper_jax.models.qwen2_5_vl import Qwen2_5_VL
from viper_jax.models.qwen2_5_vl.rope_index import prompt_positions
from viper_jax.sharding import make_mesh, param_shardings
from viper_jax.tiny import tiny_model_config
from viper_jax.train import packing
from viper_jax.train.config import base_config
from viper_jax.train.grpo_batch import RolloutBatch, full_positions, response_mask, update_inputs
from viper_jax.train.grpo_step import GRPOLearner, GRPOSettings, UpdateFns
from viper_jax.train.optim import make_optimizer
from viper_jax.train.state import init_train_state, train_state_shardings

G, N, TP = 3, 12, 64  # group size, max_new_tokens, prompt bucket (room for two sequences a row)
GRIDS = {"one": [(1, 4, 4)], "two": [(1, 4, 4), (1, 4, 8)]}  # 4 and 8 merged tokens; the second spans 2 windows
LAYOUT = ("two", "one", "two", "one")  # images of prompts 0..3
TEXT = (9, 22, 5, 15)  # text tokens of prompts 0..3 (besides the vision blocks)
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def eager():
    """Op by op: every jitted program of the update compiles in ~20 s on this shared CPU, and each layout and
    aggregation mode is its own program; eager runs the same functions and shares the compiled ops (seconds
    a case). The trainer's own tests run the compiled programs."""
    with jax.disable_jit():
        yield


@pytest.fixture(scope="module")
def world():
    return make_world()


def make_world():
    """The tiny model (fp32, random init) and a rollout batch of 4 prompts x 3 responses."""
    config = tiny_model_config(build_tiny_tokenizer())
    model = Qwen2_5_VL(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    # Small random biases and norm scales, so no parameter sits at an init value that hides a wrong path.
    params = jax.tree.map(lambda p: p + 0.02 * rng.standard_normal(p.shape).astype(p.dtype), params)
    ids, grids = np.full((4, TP), config.text.pad_token_id, np.int32), []
    for p, (kind, text) in enumerate(zip(LAYOUT, TEXT)):
        row = list(rng.integers(3, 250, 2))
        for grid in GRIDS[kind]:
            row += [config.vision_start_token_id] + [config.image_token_id] * (int(np.prod(grid)) // 4) + \
                   [config.vision_end_token_id]
            grids.append(grid)
        row += list(rng.integers(3, 250, text))
        ids[p, TP - len(row):] = row  # left-padded, as the pipeline does
    grid = np.asarray(grids, np.int32)
    lengths = np.asarray([12, 1, 5, 3, 3, 3, 7, 2, 11, 6, 1, 9])  # mixed, the cap included
    mask = response_mask(lengths, N)
    mask[3:6] = 0  # prompt 1's group dropped (drop_zero_spread): it must add nothing, packed or not
    batch = RolloutBatch(ids, (ids != config.text.pad_token_id).astype(np.int32),
                         rng.standard_normal((int(grid.prod(axis=1).sum()), 1176)).astype(np.float32), grid,
                         np.asarray([len(GRIDS[k]) for k in LAYOUT]), rng.integers(3, 250, (4 * G, N)).astype(np.int32),
                         mask, rng.standard_normal(4 * G).astype(np.float32), np.zeros((4 * G, N), np.float32), G)
    ref = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), params)
    return config, graphdef, params, ref, batch


def fns_for(world, **changes):
    config, graphdef, params, _, _ = world
    settings = GRPOSettings.with_defaults(group_size=G, **changes)
    optim = base_config().optim
    optim.learning_rate = 1e-4
    optimizer, schedule = make_optimizer(optim, 10)
    mesh = make_mesh((1, 1, 1))
    shardings = train_state_shardings(optimizer, params, param_shardings(nnx.merge(graphdef, params), mesh))
    return UpdateFns(graphdef, optimizer, shardings, settings, mesh), optimizer, shardings, schedule, settings


def with_old_logp(world, fns) -> RolloutBatch:
    """The batch with old log-probs near the policy's (noise of 0.3), so clipping bites at both bounds."""
    _, _, params, _, batch = world
    logp = np.asarray(fns.logprobs(params, update_inputs(batch, 0, 4, world[0])))
    noise = np.random.default_rng(1).normal(0, 0.3, logp.shape).astype(np.float32)
    return dataclasses.replace(batch, old_logp=(logp + noise) * batch.resp_mask)


def test_pack_layout_keeps_every_sequence_in_its_own_segment(world):
    """Each packed segment holds one response's prompt (its vision tokens included) then its counted response
    tokens, at the padded row's own positions; dropped responses are absent; no row overflows."""
    config, _, _, _, batch = world
    inputs = update_inputs(batch, 0, 4, config)
    micro = packing.pack_micro(inputs, G, TP + N, max_rows=64)
    x = micro.inputs
    assert micro.seqs == 9 and micro.tokens == int(batch.resp_mask.sum()) == int(x["resp_mask"].sum())
    assert x["segment_ids"].shape[0] == packing.row_bucket(len(packing.first_fit(
        packing._sequence_lengths(batch, 0, 4), TP + N)), 64)
    assert micro.processed == int(batch.prompt_mask.sum(1)[[0, 2, 3]].sum() * G + batch.resp_mask.sum())
    seen = 0
    for row in range(x["segment_ids"].shape[0]):
        for seg in set(x["segment_ids"][row].tolist()) - {0}:
            at = np.flatnonzero(x["segment_ids"][row] == seg)
            assert np.all(np.diff(at) == 1)  # contiguous
            src = x["prompt_src"][row, at]
            prompt = int(src[0]) // TP
            lp = int((src >= 0).sum())
            assert np.all(src[:lp] // TP == prompt) and np.all(src[lp:] == -1)  # its own prompt only, then response
            cols = src[:lp] % TP
            np.testing.assert_array_equal(cols, np.flatnonzero(batch.prompt_mask[prompt]))
            images = int((batch.prompt_ids[prompt, cols] == config.image_token_id).sum())
            assert images == sum(int(np.prod(g)) // 4 for g in GRIDS[LAYOUT[prompt]])  # its vision tokens, all
            n = len(at) - lp
            r = next(r for r in range(prompt * G, prompt * G + G)  # which response of the group
                     if batch.resp_mask[r].sum() == n and np.array_equal(batch.tokens[r, :n], x["ids"][row, at[lp:]]))
            pos = full_positions(prompt_positions(batch.prompt_ids, batch.prompt_mask, batch.image_grid_thw, config),
                                 N, G)[:, r]
            np.testing.assert_array_equal(x["positions"][:, row, at], pos[:, np.r_[cols, TP:TP + n]])
            # The positions predicting its response: the prompt's last token, then response tokens 0 .. n-2.
            flat = row * (TP + N) + at[lp - 1:-1]
            ks = np.flatnonzero(np.isin(x["pred_index"], flat) & (x["resp_mask"][0] > 0))
            np.testing.assert_array_equal(x["pred_index"][ks], flat)
            np.testing.assert_array_equal(x["targets"][0, ks], batch.tokens[r, :n])
            assert np.all(x["seq_tokens"][0, ks] == n) and np.all(x["advantages"][0, ks] == batch.advantages[r])
            seen += 1
    assert seen == 9


def accumulate(fns, params, ref, denoms, micros) -> tuple[float, dict, dict]:
    """(summed loss, summed gradients, summed metric sums) of micro-batches sharing `denoms`, reference
    log-probs (the KL term) from `ref`."""
    acc, loss, sums = fns.zeros(params), 0.0, {}
    for m in micros:
        m.inputs["ref_logp"] = np.asarray(fns.logprobs(ref, m.inputs))
        acc, part = fns.accumulate(params, acc, m.inputs, denoms)
        loss += float(part["loss"])
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in part.items()}
    return loss, jax.device_get(acc), sums


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_packed_loss_and_gradients_equal_the_padded(world, aggregation):
    """The summed micro-batch losses and gradients of one minibatch (shared denominators): padded micro-batches
    of 2 prompts vs packed ones under a budget of 3 rows (so both layouts cut the minibatch differently), with
    KL (reference log-probs from other parameters) and entropy terms in the loss."""
    config, _, params, ref, _ = world
    fns, *_ = fns_for(world, aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01)
    batch = with_old_logp(world, fns)
    denoms = {"tokens": jnp.float32(batch.resp_mask.sum()), "seqs": jnp.float32(9), "norm_length": jnp.float32(N)}

    padded = accumulate(fns, params, ref, denoms,
                        [packing.padded_micro(batch, a, a + 2, update_inputs(batch, a, a + 2, config)) for a in (0, 2)])
    micros = packing.pack_minibatch(batch, 0, 4, config, max_rows=3)
    assert len(micros) >= 2 and max(m.inputs["segment_ids"].max() for m in micros) >= 2  # rows hold several
    packed = accumulate(fns, params, ref, denoms, micros)
    assert abs(padded[0]) > 1e-3 and padded[2]["clip_frac_low"] > 0 and padded[2]["clip_frac_high"] > 0
    np.testing.assert_allclose(packed[0], padded[0], **TOL)
    for k in padded[2]:
        np.testing.assert_allclose(packed[2][k], padded[2][k], **TOL, err_msg=k)
    grads = list(zip(jax.tree.leaves(padded[1]), jax.tree.leaves(packed[1])))
    assert max(float(np.abs(a).max()) for a, _ in grads) > 1e-3
    vision = jax.tree.leaves(padded[1]["visual"])
    assert max(float(np.abs(a).max()) for a in vision) > 1e-6  # the images take part in the gradient
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(padded[1])[0], jax.tree.leaves(packed[1])):
        np.testing.assert_allclose(b, a, **TOL, err_msg=jax.tree_util.keystr(path))


def test_learner_update_packed_and_trimmed_equal_padded(world):
    """GRPOLearner._update (two minibatches, old log-probs recomputed, KL on, Dr. GRPO's aggregation, whose
    denominator must stay max_new_tokens when the span shrinks): padded at full width, padded
    with the response span trimmed to the longest (rl.response_bucket), and packed give the same metrics;
    packed runs on fewer token slots."""
    config, graphdef, params, ref, _ = world
    runs = {}
    for name, changes in (("padded", {}), ("trimmed", dict(response_bucket=4)),
                          ("packed", dict(packing=True, response_bucket=4, pack_tokens=3 * (TP + N)))):
        fns, optimizer, shardings, schedule, settings = fns_for(
            world, aggregation="seq-mean-token-sum-norm", kl_coef=0.1, num_minibatches=2,
            recompute_old_logprobs=True, **changes)
        batch = with_old_logp(world, fns)
        mask = batch.resp_mask.copy()
        mask[:, 7:] = 0  # the longest counted response has 7 tokens: the span is trimmed to 4 * 2 = 8 of 12 columns
        batch = dataclasses.replace(batch, resp_mask=mask, old_logp=batch.old_logp * mask)
        learner = GRPOLearner(graphdef, init_train_state(params, optimizer, shardings, donate=False), fns, settings,
                              None, None, schedule, config, ref_params=ref)
        runs[name] = learner._update(batch)
    base = runs["padded"]
    assert base["update/updates"] == 2 and base["update/kl"] > 0
    assert base["rollout/logprob_diff_max"] > 0.1  # the noisy old log-probs were replaced by recomputed ones
    for name in ("trimmed", "packed"):
        for key in ("update/loss", "update/pg_loss", "update/kl", "update/entropy", "update/clip_frac_low",
                    "update/clip_frac_high", "update/approx_kl_old", "update/grad_norm", "rollout/logprob_diff_max"):
            np.testing.assert_allclose(runs[name][key], base[key], **TOL, err_msg=f"{name} {key}")
    assert runs["packed"]["processed_tokens"] < runs["trimmed"]["processed_tokens"] < base["processed_tokens"]


def test_response_width_and_first_fit():
    mask = response_mask(np.asarray([3, 0, 9]), 32)
    assert packing.response_width(mask, 4) == 16 and packing.response_width(mask, 0) == 32
    assert packing.response_width(mask, 64) == 32  # never past max_new_tokens
    rows = packing.first_fit(np.asarray([5, 0, 3, 7, 2, 4]), 8)
    assert sorted(i for r in rows for i in r) == [0, 2, 3, 4, 5]  # the empty sequence is left out
    assert all(sum([5, 0, 3, 7, 2, 4][i] for i in r) <= 8 for r in rows) and len(rows) == 3
    with pytest.raises(ValueError, match="does not fit"):
        packing.first_fit(np.asarray([9]), 8)
    assert [packing.row_bucket(n, 6) for n in (1, 3, 5, 6, 9)] == [1, 3, 5, 6, 9]
    assert [packing.row_bucket(n, 64) for n in (1, 9, 64, 70)] == [8, 16, 64, 70]  # eighths of the budget
    assert [packing.row_bucket(n, 6, multiple=4) for n in (1, 3, 5, 9)] == [4, 4, 8, 12]  # the mesh's batch shards


def test_padding_packed_micro_batches_changes_nothing(world):
    """pad_packed, as several processes use it to agree on shapes (grpo_multihost.agree_packed): packed micro-batches
    grown by prompts, rows and predicted slots, plus an empty one (a process short of micro-batches), give the
    same loss, metric sums and gradients (seq-mean-token-mean, KL and entropy on); the vision tower still takes part."""
    config, _, params, ref, _ = world
    fns, *_ = fns_for(world, aggregation="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.01)
    batch = with_old_logp(world, fns)
    denoms = {"tokens": jnp.float32(batch.resp_mask.sum()), "seqs": jnp.float32(9), "norm_length": jnp.float32(N)}
    micros = packing.pack_minibatch(batch, 0, 4, config, max_rows=3)
    pad = config.text.pad_token_id
    grown = [packing.pad_packed(m, len(m.inputs["prompt_ids"]) + 2, m.inputs["ids"].shape[0] + 3,
                                m.inputs["pred_index"].shape[0] + 5, pad) for m in micros]
    empty = packing.pad_packed(micros[0], 2, 4, 24, pad, keep=False)
    for m, g in zip(micros, grown):
        x, y = m.inputs, g.inputs
        assert y["prompt_ids"].shape[0] == x["prompt_ids"].shape[0] + 2 and "pixel_values" in y
        assert y["segment_ids"].shape == (x["segment_ids"].shape[0] + 3, TP + N)
        assert y["positions"].shape[1:] == y["ids"].shape
        assert all(y[k].shape == (1, x["pred_index"].shape[0] + 5) for k in ("targets", "resp_mask", "old_logp"))
        assert (g.tokens, g.seqs, g.processed, g.prompts) == (m.tokens, m.seqs, m.processed, m.prompts)
    assert (empty.tokens, empty.seqs, empty.processed) == (0, 0, 0)
    assert (empty.inputs["ids"].shape, empty.inputs["prompt_ids"].shape) == ((4, TP + N), (2, TP))
    want = accumulate(fns, params, ref, denoms, micros)
    got = accumulate(fns, params, ref, denoms, grown + [empty])
    assert abs(want[0]) > 1e-3
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for k in want[2]:
        np.testing.assert_allclose(got[2][k], want[2][k], **TOL, err_msg=k)
    assert max(float(np.abs(a).max()) for a in jax.tree.leaves(want[1]["visual"])) > 1e-6
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want[1])[0], jax.tree.leaves(got[1])):
        np.testing.assert_allclose(b, a, **TOL, err_msg=jax.tree_util.keystr(path))
    nothing = accumulate(fns, params, ref, denoms, [empty])  # the empty one alone: zero loss, zero gradients
    assert nothing[0] == 0 and all(not np.any(a) for a in jax.tree.leaves(nothing[1]))


def test_packing_with_several_processes_needs_whole_shares():
    """Packed, a minibatch's prompts split evenly over the processes (rl.micro_batch_prompts does not matter:
    packed micro-batches are padded to shapes every shard divides); otherwise a ConfigError naming the setting."""
    from types import SimpleNamespace

    from viper_jax.train.config import ConfigError
    from viper_jax.train.grpo_multihost import check_split

    rl = base_config().rl
    rl.prompts_per_step, rl.micro_batch_prompts, rl.packing = 4, 1, True
    check_split(rl, SimpleNamespace(count=2, per_process=2))  # padded, 1 prompt over 4 shards would be refused
    rl.packing = False
    with pytest.raises(ConfigError, match="multiple of the mesh's 4 batch shards"):
        check_split(rl, SimpleNamespace(count=2, per_process=2))
    rl.packing, rl.num_minibatches = True, 4  # a minibatch of 1 prompt cannot split over 2 processes
    with pytest.raises(ConfigError, match="rl.packing the prompts of every minibatch"):
        check_split(rl, SimpleNamespace(count=2, per_process=2))
