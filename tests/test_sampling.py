"""Sampling on known distributions: top-k, top-p nucleus, temperature, seeds, greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viper_jax.rollout.sampling import SamplingConfig, draw, filtered_logits, sample

PROBS = np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32)
LOGITS = jnp.log(jnp.asarray(PROBS))[None]


def _draw(cfg, n=4000, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    tokens, logprobs = jax.vmap(lambda k: sample(LOGITS, k, cfg))(keys)
    return np.asarray(tokens[:, 0]), np.asarray(logprobs[:, 0])


def test_top_k_keeps_k_most_likely():
    kept = np.isfinite(np.asarray(filtered_logits(LOGITS, SamplingConfig(top_k=2))))[0]
    np.testing.assert_array_equal(kept, [True, True, False, False, False])
    tokens, _ = _draw(SamplingConfig(top_k=2))
    assert set(tokens) == {0, 1}
    # Renormalised: 0.5 / 0.7 of draws are token 0 (binomial std ~0.007 at n=4000).
    assert abs((tokens == 0).mean() - 0.5 / 0.7) < 0.03


@pytest.mark.parametrize("top_p,expected", [(0.5, [0]), (0.6, [0, 1]), (0.7, [0, 1]),
                                            (0.8, [0, 1, 2]), (0.9, [0, 1, 2, 3])])
def test_top_p_keeps_the_nucleus(top_p, expected):
    kept = np.flatnonzero(np.isfinite(np.asarray(filtered_logits(LOGITS, SamplingConfig(top_p=top_p)))[0]))
    np.testing.assert_array_equal(kept, expected)


def test_top_p_frequencies_follow_the_renormalised_nucleus():
    tokens, _ = _draw(SamplingConfig(top_p=0.8))
    freq = np.bincount(tokens, minlength=5) / len(tokens)
    np.testing.assert_allclose(freq, np.r_[PROBS[:3] / PROBS[:3].sum(), 0, 0], atol=0.03)


def test_inverse_cdf_draw_follows_the_distribution_across_blocks():
    # 300 tokens = two full 128-token blocks and a partial one; mass in all three, zeros in between.
    probs = np.zeros(300, np.float32)
    probs[[3, 127, 128, 200, 299]] = [0.1, 0.25, 0.3, 0.15, 0.2]
    logits = jnp.log(jnp.asarray(probs))[None]  # -inf where the probability is 0
    keys = jax.random.split(jax.random.key(5), 20000)
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: draw(logits, k)))(keys))[:, 0]
    freq = np.bincount(tokens, minlength=300) / len(tokens)
    assert set(np.unique(tokens)) == {3, 127, 128, 200, 299}  # zero-probability tokens never drawn
    np.testing.assert_allclose(freq, probs, atol=0.012)  # binomial std <= 0.0033 at n=20000


def test_top_k_one_equals_greedy():
    logits = jax.random.normal(jax.random.key(1), (6, 50)) * 3
    greedy, lp_greedy = sample(logits, jax.random.key(0), SamplingConfig(greedy=True))
    top1, lp_top1 = sample(logits, jax.random.key(7), SamplingConfig(top_k=1))
    np.testing.assert_array_equal(greedy, top1)
    np.testing.assert_allclose(lp_greedy, lp_top1, atol=1e-6)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))


def test_fixed_seed_is_reproducible_and_seeds_differ():
    logits = jax.random.normal(jax.random.key(2), (16, 100))
    cfg = SamplingConfig(temperature=1.0)
    a, _ = sample(logits, jax.random.key(3), cfg)
    b, _ = sample(logits, jax.random.key(3), cfg)
    c, _ = sample(logits, jax.random.key(4), cfg)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()


def test_logprob_is_under_the_sampling_temperature_over_the_full_vocabulary():
    cfg = SamplingConfig(temperature=0.7, top_k=3)
    tokens, logprobs = _draw(cfg, n=64)
    expected = np.log(PROBS ** (1 / 0.7) / (PROBS ** (1 / 0.7)).sum())[tokens]
    np.testing.assert_allclose(logprobs, expected, atol=1e-5)


def test_temperature_sharpens():
    cold, _ = _draw(SamplingConfig(temperature=0.25))
    hot, _ = _draw(SamplingConfig(temperature=1.0))
    assert (cold == 0).mean() > (hot == 0).mean() + 0.2


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)
