"""The GRPO update against the rollout it learns from, and the trainer learning a toy task on CPU."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_tiny import compilation_cache, tiny_config
from viper_jax.models.qwen2_5_vl import get_rope_index, load_hf
from viper_jax.models.qwen2_5_vl.rope_index import mm_token_types
from viper_jax.tiny import write_tiny_model, write_tiny_records


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    write_tiny_records(root / "data", per_task=8)
    with compilation_cache(root / "jax_cache"):
        yield root


def test_update_forward_reproduces_rollout_logprobs(root):
    """The training forward (prompt embedded once per group, vision tower included, positions built
    from the prompt's) gives the log-probs the sampler drew with, and its positions are get_rope_index's
    over prompt + response. Chunked lm_head = unchunked. (Two-image prompts: test_grpo_e2e.py checks
    the same through the trainer's `rollout/logprob_diff_max`.) Shapes are the trainer's in the next
    test, so the rollout programs compile once for both."""
    from transformers import AutoTokenizer

    from viper_jax.data import make_pipeline
    from viper_jax.rollout.engine import RolloutConfig, generate
    from viper_jax.rollout.sampling import SamplingConfig
    from viper_jax.models.qwen2_5_vl.rope_index import prompt_positions
    from viper_jax.train.grpo_batch import RolloutBatch, full_positions, response_mask, update_inputs
    from viper_jax.train.grpo_step import policy_forward
    from viper_jax.train.stage_data import stage_data_config

    path = root / "model"
    write_tiny_model(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = load_hf(path)
    # lr 3e-2 as in the next test: the optimizer program compiled here is the one it runs.
    config = tiny_config(root / "unused", root / "data", ["--config.optim.learning_rate=3e-2"])
    batch = next(make_pipeline(stage_data_config(config, "caption_refine", 0), tok))
    g, n, temp = config.rl.group_size, config.rollout.max_new_tokens, config.rollout.temperature
    buckets = tuple(config.data.length_buckets)
    cfg = RolloutConfig(max_new_tokens=n, prompt_buckets=buckets, max_cache_len=buckets[-1] + n,
                        eos_token_ids=tuple(int(tok.convert_tokens_to_ids(t)) for t in config.rollout.eos_tokens),
                        pad_token_id=int(tok.pad_token_id), group_size=g, sampling=SamplingConfig(temperature=temp))
    pix = batch["pixel_values"][:int(batch["num_patches"])]
    ro = generate(model, batch["input_ids"], batch["attention_mask"], jax.random.key(3), cfg, pixel_values=pix,
                  image_grid_thw=batch["image_grid_thw"])
    mask = response_mask(ro.lengths, n)
    rb = RolloutBatch(batch["input_ids"], batch["attention_mask"], pix, batch["image_grid_thw"],
                      batch["images_per_sample"], ro.tokens, mask, np.zeros(len(mask), np.float32), ro.logprobs, g)

    full_ids = np.concatenate([np.repeat(batch["input_ids"], g, 0), ro.tokens], 1)
    full_mask = np.concatenate([np.repeat(batch["attention_mask"], g, 0), mask.astype(np.int32)], 1)
    per_prompt = np.split(batch["image_grid_thw"], np.cumsum(batch["images_per_sample"])[:-1])
    grids = np.concatenate([grid for grid in per_prompt for _ in range(g)])
    # A sampled response can contain a placeholder id (the tiny model samples the whole vocabulary):
    # it is text there, as the processor's mm_token_type_ids say; only the prompt's placeholders are images.
    types = np.concatenate([np.repeat(mm_token_types(batch["input_ids"], model.config), g, 0),
                            np.zeros_like(ro.tokens, np.int32)], 1)
    expected, _ = get_rope_index(full_ids, full_mask, grids, None, None, model.config, types)
    ours = full_positions(prompt_positions(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                                          model.config), n, g)
    valid = full_mask.astype(bool)
    np.testing.assert_array_equal(ours[:, valid], expected[:, valid])

    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    mi = update_inputs(rb, 1, 3, model.config)  # prompts 1 and 2: pixel rows and positions sliced per prompt
    rows = slice(g, 3 * g)
    fwd = jax.jit(lambda p, mi, chunk: policy_forward(nnx.merge(graphdef, p), mi, g, temp, chunk), static_argnums=2)
    logp, ent = fwd(params, mi, 0)
    np.testing.assert_allclose(np.asarray(logp) * mask[rows], ro.logprobs[rows] * mask[rows], atol=2e-5)
    logp_c, ent_c = fwd(params, mi, 5)  # 16 positions in chunks of 5: the last one padded
    np.testing.assert_allclose(np.asarray(logp_c), np.asarray(logp), atol=1e-5)  # other matmul shapes: ~1 ulp
    np.testing.assert_allclose(np.asarray(ent_c), np.asarray(ent), atol=1e-5)
    assert np.all(np.asarray(ent) > 0)

    # Gradient accumulation: two micro-batches of one prompt sharing the minibatch's denominators sum to
    # the gradient of the two-prompt minibatch.
    from viper_jax.sharding import make_mesh, param_shardings
    from viper_jax.train.grpo_step import GRPOSettings, UpdateFns
    from viper_jax.train.optim import make_optimizer
    from viper_jax.train.state import train_state_shardings

    mesh = make_mesh((1, 1, 1))
    optimizer, _ = make_optimizer(config.optim, 10)
    shardings = train_state_shardings(optimizer, params, param_shardings(model, mesh))
    fns = UpdateFns(graphdef, optimizer, shardings, GRPOSettings.from_config(config.rl, temp), mesh)
    rb.advantages = np.random.default_rng(0).normal(size=len(mask)).astype(np.float32)
    denoms = {"tokens": np.float32(mask[:2 * g].sum()), "seqs": np.float32(2 * g)}
    whole, _ = fns.accumulate(params, fns.zeros(params), update_inputs(rb, 0, 2, model.config), denoms)
    acc = fns.zeros(params)
    for a in (0, 1):
        acc, _ = fns.accumulate(params, acc, update_inputs(rb, a, a + 1, model.config), denoms)
    for x, y in zip(jax.tree.leaves(acc), jax.tree.leaves(whole)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-4)
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(whole)) > 1e-4

    # A non-finite loss or gradient leaves the state as it was and is counted; a finite one applies.
    from viper_jax.train.state import init_train_state

    state = init_train_state(params, optimizer, shardings, donate=False)
    before = jax.device_get(state.params)
    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), whole)
    for grads, loss in ((whole, jnp.float32(jnp.nan)), (poisoned, jnp.float32(1.0))):
        state, stats = fns.apply(state, grads, loss)
        assert bool(stats["skipped"])
        assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state.params), before))
    for _ in range(2):  # warmup from lr 0: the first applied update leaves the weights as they are
        state, stats = fns.apply(state, whole, jnp.float32(1.0))
        assert not bool(stats["skipped"])
    assert (int(state.step), int(state.skipped)) == (2, 2)
    assert not jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state.params), before))


def test_zero_spread_groups_are_masked_out():
    from viper_jax.train.grpo_step import GRPOSettings, advantages_and_mask

    rewards = np.asarray([0.5, 0.5, 0.2, 0.8], np.float32)  # group 0 all equal, group 1 spread
    lengths = np.asarray([2, 3, 1, 3])
    adv, mask, zero = advantages_and_mask(rewards, lengths, 3, GRPOSettings.with_defaults(group_size=2, drop_zero_spread=True))
    np.testing.assert_array_equal(zero, [True, True, False, False])
    np.testing.assert_array_equal(mask, [[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]])
    np.testing.assert_allclose(adv, [0, 0, -0.3 / (0.3 * np.sqrt(2) + 1e-6), 0.3 / (0.3 * np.sqrt(2) + 1e-6)], rtol=1e-5)
    _, kept, _ = advantages_and_mask(rewards, lengths, 3, GRPOSettings.with_defaults(group_size=2))
    np.testing.assert_array_equal(kept[:2], [[1, 1, 0], [1, 1, 1]])


def test_it_learns_a_toy_reward(root):
    """Tiny random-init policy, reward = fraction of lower-case letters (about 0.1 at random): the mean
    reward of the last steps is far above that of the first ones (fixed seed)."""
    from viper_jax.train.trainer import train

    steps = 12
    config = tiny_config(root / "learn", root / "data", [
        "--config.stage_order=('caption_refine',)", f"--config.stages.caption_refine.steps={steps}",
        "--config.stages.caption_refine.reward=toy_letters", "--config.optim.learning_rate=3e-2",
        "--config.checkpoint.every_steps=100"])
    train(config)
    rows = [json.loads(line) for line in (root / "learn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    rewards = np.asarray([r["reward/mean"] for r in rows])
    first, last = rewards[:3].mean(), rewards[-3:].mean()
    assert first < 0.25 and last > first + 0.3, rewards.round(3).tolist()
    assert all(r["update/skipped_nonfinite"] == 0 and r["update/updates"] == 2 for r in rows)


def test_responses_end_at_the_first_stop_string(root):
    """rollout.stop_strings (every lower-case letter: about 10% of a random policy's characters): each response
    the reward sees holds no stop string or ends at its first one; rows cut there count as ended."""
    import string

    from viper_jax.rl.reward import register_reward
    from viper_jax.rl.toy_rewards import LetterFraction
    from viper_jax.train.trainer import train

    seen: list[str] = []

    class Recording(LetterFraction):
        def __call__(self, responses, truths, prompt_index=None):
            seen.extend(responses)
            return super().__call__(responses, truths, prompt_index)

    register_reward("recording_letters", overwrite=True)(Recording)
    stops = tuple(string.ascii_lowercase)
    config = tiny_config(root / "stop", root / "data", [
        "--config.stage_order=('caption_refine',)", "--config.stages.caption_refine.steps=2",
        "--config.stages.caption_refine.reward=recording_letters", f"--config.rollout.stop_strings={stops!r}",
        "--config.checkpoint.every_steps=100"])
    train(config)
    rows = [json.loads(line) for line in (root / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert len(seen) == 2 * 16
    stopped = [r for r in seen if any(c in stops for c in r)]
    assert len(stopped) >= 8, seen
    for r in stopped:  # one letter, the last character
        assert r[-1] in stops and not any(c in stops for c in r[:-1]), r
    truncated = np.mean([r["response_length/truncated_rate"] for r in rows])
    assert truncated <= 1 - len(stopped) / len(seen) + 1e-6


def test_per_layer_modules_train_resume_and_export(root):
    """model.scan_layers=False: the trainer loads the HF weights into per-layer modules, checkpoints them
    as such, resumes, and exports an HF directory whose layers match the checkpoint's."""
    from viper_jax.convert import load_orbax
    from viper_jax.models.qwen2_5_vl import load_hf
    from viper_jax.train.trainer import ConfigError, train

    work = root / "per_layer"
    args = ["--config.stage_order=('caption_refine',)", "--config.stages.caption_refine.reward=toy_letters",
            "--config.model.scan_layers=False", "--config.checkpoint.every_steps=1",
            f"--config.export.hf_dir={work / 'hf'}"]
    train(tiny_config(work, root / "data", [*args, "--config.stages.caption_refine.steps=1"]))
    train(tiny_config(work, root / "data", [*args, "--config.stages.caption_refine.steps=2"]))  # resumes at 1
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    trained = nnx.to_pure_dict(nnx.state(load_orbax(work / "checkpoints", scan_layers=False), nnx.Param))
    assert sorted(trained["language_model"]["layers"]) == [0, 1]
    exported = nnx.to_pure_dict(nnx.state(load_hf(work / "hf", scan_layers=False), nnx.Param))
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    flipped = [a.replace("scan_layers=False", "scan_layers=True") for a in args]
    with pytest.raises(ConfigError, match=r"holds its layers per layer .*model\.scan_layers=True"):
        train(tiny_config(work, root / "data", [*flipped, "--config.stages.caption_refine.steps=3"]))


def test_update_batch_splits_the_rollout_batch(root):
    """rl.update_prompts U = R/2: the rollout batch of R prompts x G responses gives two optimizer updates
    (state.step advances by 2), both against the old log-probs taken once from the rollout policy; the first
    update's loss and parameters are those of a single update on the same rows alone. U = R is the default."""
    from transformers import AutoTokenizer

    from viper_jax.data import make_pipeline
    from viper_jax.sharding import make_mesh, param_shardings
    from viper_jax.train.config import apply_overrides, updates_per_step, validate
    from viper_jax.train.grpo_batch import RolloutBatch, response_mask
    from viper_jax.train.grpo_step import GRPOLearner, GRPOSettings, UpdateFns
    from viper_jax.train.optim import make_optimizer
    from viper_jax.train.stage_data import stage_data_config
    from viper_jax.train.state import init_train_state, train_state_shardings

    path = root / "model"
    if not (path / "config.json").exists():
        write_tiny_model(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = load_hf(path)
    overrides = ["--config.optim.learning_rate=3e-2", "--config.optim.warmup_steps=0",
                 "--config.rl.recompute_old_logprobs=true"]

    def configured(*flags):
        c = tiny_config(root / "unused", root / "data", [*overrides, *flags])
        validate(c)
        return c

    default = configured("--config.rl.num_minibatches=1")
    halves = configured("--config.rl.num_minibatches=1", "--config.rl.update_prompts=2")
    whole = configured("--config.rl.num_minibatches=1", "--config.rl.update_prompts=4")
    temp = default.rollout.temperature
    s_default, s_halves, s_whole = (GRPOSettings.from_config(c.rl, temp) for c in (default, halves, whole))
    assert (s_default.num_minibatches, s_halves.num_minibatches) == (1, 2)
    assert s_whole == s_default  # U = R explicitly: the settings (so the update) of the default
    assert (updates_per_step(default.rl), updates_per_step(halves.rl)) == (1, 2)

    batch = next(make_pipeline(stage_data_config(default, "caption_refine", 0), tok))
    g, n, r = default.rl.group_size, default.rollout.max_new_tokens, len(batch["input_ids"])
    assert r == 4
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, n + 1, size=r * g)
    mask = response_mask(lengths, n)
    tokens = rng.integers(3, 200, size=(r * g, n)).astype(np.int32)
    adv = rng.normal(size=r * g).astype(np.float32)
    grid, per = np.asarray(batch["image_grid_thw"]), np.asarray(batch["images_per_sample"])
    pix = np.asarray(batch["pixel_values"])[:int(batch["num_patches"])]

    def rollout_batch(stop):  # prompts [0, stop) and their rows
        images = int(per[:stop].sum())
        return RolloutBatch(np.asarray(batch["input_ids"])[:stop], np.asarray(batch["attention_mask"])[:stop],
                            pix[:int(grid[:images].prod(axis=1).sum())], grid[:images], per[:stop],
                            tokens[:stop * g], mask[:stop * g], adv[:stop * g], np.zeros_like(mask[:stop * g]), g)

    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    mesh = make_mesh((1, 1, 1))
    optimizer, schedule = make_optimizer(default.optim, 10)
    shardings = train_state_shardings(optimizer, params, param_shardings(model, mesh))
    fns = UpdateFns(graphdef, optimizer, shardings, s_halves, mesh)
    applied = []
    apply = fns.apply

    def recording(st, grads, loss):  # every optimizer update: its minibatch loss and the new parameters
        new, stats = apply(st, grads, loss)
        applied.append((float(loss), jax.device_get(new.params)))
        return new, stats

    fns.apply = recording

    def run(settings, rb):
        applied.clear()
        learner = GRPOLearner(graphdef, init_train_state(params, optimizer, shardings, donate=False), fns, settings,
                              None, None, schedule, model.config)
        out = learner._update(rb)
        return out, int(learner.state.step), list(applied)

    out, steps, two = run(s_halves, rollout_batch(4))
    assert steps == 2 and len(two) == 2 and out["update/updates"] == 2 and out["update/optimizer_steps"] == 2
    # The second minibatch's ratios are against the rollout policy's log-probs, not the updated policy's.
    assert out["update/approx_kl_old"] > 0
    _, steps, one = run(s_default, rollout_batch(2))  # prompts 0, 1 alone: one update
    assert steps == 1 and len(one) == 1
    assert two[0][0] == one[0][0] and two[0][0] != 0
    for a, b in zip(jax.tree.leaves(two[0][1]), jax.tree.leaves(one[0][1])):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(two[1][1]), jax.tree.leaves(two[0][1])))
    _, steps, single = run(s_default, rollout_batch(4))  # the default: one update over all four prompts
    assert steps == 1 and len(single) == 1 and single[0][0] != two[0][0]
