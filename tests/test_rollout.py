"""Rollout engine against transformers' greedy generate, and its log-probs against a full forward pass."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_tiny import PAD, build_hf_model, build_inputs, hf_config, to_torch
from viper_jax.models.qwen2_5_vl import load_hf
from viper_jax.rl.grpo_loss import token_logprobs
from viper_jax.rollout.engine import RolloutConfig, generate
from viper_jax.rollout.sampling import SamplingConfig

EOS = 1
NEW = 12
CASES = {
    "text_batch_different_lengths": [[5], [9], [2]],
    "one_image": [[3, ("image", (1, 8, 12)), 4]],
    "two_images": [[3, ("image", (1, 8, 12)), 2, ("image", (1, 6, 10)), 4]],
    "batch_of_image_prompts": [[3, ("image", (1, 4, 4)), 4], [2, ("image", (1, 10, 6)), 1]],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = build_hf_model(hf_config(), seed=3)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, load_hf(path)


def _cfg(**kw) -> RolloutConfig:
    base = RolloutConfig(max_new_tokens=NEW, prompt_buckets=(32, 64, 128), max_cache_len=256,
                         eos_token_ids=(EOS,), pad_token_id=PAD, sampling=SamplingConfig(greedy=True))
    return dataclasses.replace(base, **kw)


def _run(model, inputs, cfg, seed=0):
    return generate(model, inputs["input_ids"], inputs["attention_mask"], jax.random.key(seed), cfg,
                    pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"))


def _trim(row: np.ndarray) -> list[int]:
    out = []
    for t in row.tolist():
        out.append(t)
        if t == EOS:
            break
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers_generate(models, case):
    hf, ours = models
    inputs = build_inputs(CASES[case], seed=4)
    with torch.no_grad():
        hf.model.rope_deltas = None
        ref = hf.generate(**to_torch(inputs), max_new_tokens=NEW, do_sample=False, eos_token_id=EOS,
                          pad_token_id=PAD).numpy()[:, inputs["input_ids"].shape[1]:]
    result = _run(ours, inputs, _cfg())
    for row in range(len(ref)):
        assert _trim(result.tokens[row]) == _trim(ref[row]), f"row {row}"
        assert result.lengths[row] == len(_trim(ref[row]))


def test_logprobs_equal_a_full_forward_pass(models):
    _, ours = models
    inputs = build_inputs(CASES["batch_of_image_prompts"], seed=5)
    temperature = 0.7
    cfg = _cfg(sampling=SamplingConfig(temperature=temperature), group_size=3, eos_token_ids=())
    result = _run(ours, inputs, cfg, seed=11)
    rows = np.repeat(np.arange(2), 3)
    prompt_ids = inputs["input_ids"][rows]
    ids = np.concatenate([prompt_ids, result.tokens], axis=1)
    mask = np.concatenate([inputs["attention_mask"][rows], np.ones_like(result.tokens)], axis=1)
    # Full forward over prompt + response: each sample has its own copy of its prompt's images.
    grids = inputs["image_grid_thw"]
    sizes = np.prod(grids, axis=1)
    starts = np.r_[0, np.cumsum(sizes)]
    pix = np.concatenate([inputs["pixel_values"][starts[r]:starts[r + 1]] for r in rows])
    logits = ours(jnp.asarray(ids), jnp.asarray(mask), pixel_values=jnp.asarray(pix), image_grid_thw=grids[rows])
    t = prompt_ids.shape[1]
    expected = token_logprobs(logits[:, t - 1:-1], jnp.asarray(result.tokens), temperature)
    np.testing.assert_allclose(result.logprobs, np.asarray(expected), atol=1e-4)
    # Samples of one group differ (temperature 0.7 over a random model).
    assert len({tuple(r) for r in result.tokens[:3].tolist()}) > 1


def test_group_of_samples_is_reproducible_per_seed(models):
    _, ours = models
    inputs = build_inputs(CASES["one_image"], seed=6)
    cfg = _cfg(sampling=SamplingConfig(temperature=1.0), group_size=4)
    a, b, c = (_run(ours, inputs, cfg, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    np.testing.assert_array_equal(a.prompt_index, [0, 0, 0, 0])
    # 33 prompt tokens -> bucket 64. k+v x layers x rows x slots x kv heads x head_dim x fp32 bytes.
    assert a.kv_cache_bytes == 2 * 2 * 4 * (64 + NEW) * 2 * 16 * 4


def test_prompt_longer_than_largest_bucket_is_refused(models):
    _, ours = models
    inputs = build_inputs([[200]], seed=7)
    with pytest.raises(ValueError, match="longer than the largest bucket 128"):
        _run(ours, inputs, _cfg())


def test_max_new_tokens_beyond_the_cache_is_refused(models):
    _, ours = models
    inputs = build_inputs([[5]], seed=7)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        _run(ours, inputs, _cfg(max_new_tokens=250))
