"""GRPO formulas against values computed by hand (numbers in the comments)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viper_jax.rl import grpo_loss as gl


def test_group_advantages_hand_computed():
    # group 1: [1, 0, 0.5] mean 0.5, unbiased std 0.5 -> [1, -1, 0]; group 2: [2, 2, 2] -> zeros.
    adv = gl.group_advantages(jnp.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0]), 3, eps=0.0)
    np.testing.assert_allclose(adv[:3], [1.0, -1.0, 0.0], atol=1e-6)
    adv = gl.group_advantages(jnp.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0]), 3)
    np.testing.assert_allclose(adv[3:], 0.0)


def test_group_advantages_scales():
    r = jnp.array([1.0, 0.0, 3.0, 5.0])
    np.testing.assert_allclose(gl.group_advantages(r, 2, scale="none"), [0.5, -0.5, -1.0, 1.0])
    batch_std = np.std([1, 0, 3, 5], ddof=1)
    np.testing.assert_allclose(gl.group_advantages(r, 2, scale="batch", eps=0.0),
                               np.array([0.5, -0.5, -1.0, 1.0]) / batch_std, rtol=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        gl.group_advantages(r, 3)


def test_zero_spread_groups():
    flags = gl.zero_spread_groups(jnp.array([1.0, 1.0, 0.2, 0.7]), 2)
    np.testing.assert_array_equal(flags, [True, True, False, False])


def test_token_logprobs_and_entropy_hand_computed():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]]))
    np.testing.assert_allclose(gl.token_logprobs(logits, jnp.array([[1]])), [[np.log(0.25)]], atol=1e-6)
    # H = -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.0397208
    np.testing.assert_allclose(gl.entropy(logits), [[1.0397208]], atol=1e-6)
    # T = 2: p ∝ sqrt([.5,.25,.25]) = [.7071,.5,.5]/1.7071 -> p[0] = 0.4142136
    np.testing.assert_allclose(gl.token_logprobs(logits, jnp.array([[0]]), 2.0), [[np.log(0.4142136)]], atol=1e-6)


def test_kl_estimators():
    logp, ref = jnp.array([np.log(0.5)]), jnp.array([np.log(0.25)])
    d = np.log(0.5)  # log ref - log pi
    np.testing.assert_allclose(gl.kl_estimate(logp, ref, "k1"), [-d], atol=1e-6)
    np.testing.assert_allclose(gl.kl_estimate(logp, ref, "k2"), [0.5 * d * d], atol=1e-6)
    np.testing.assert_allclose(gl.kl_estimate(logp, ref, "k3"), [0.5 - d - 1], atol=1e-6)
    np.testing.assert_allclose(gl.kl_estimate(logp, logp, "k3"), [0.0])


def _loss_inputs():
    # Three tokens of one response (advantage +1) and three of another (advantage -1); the last is padding.
    old = jnp.zeros((2, 3))
    logp = jnp.log(jnp.array([[1.5, 1.0, 0.9], [0.5, 1.1, 7.0]]))  # ratios, since old log-prob is 0
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    return logp, old, jnp.array([1.0, -1.0]), mask


def test_policy_loss_token_mean_hand_computed():
    logp, old, adv, mask = _loss_inputs()
    loss, m = gl.policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # A=+1: -min(r, clip(r, .8, 1.28)) = [-1.28, -1.0, -0.9]
    # A=-1: max(r, clip(r, .8, 1.28)) = [0.8, 1.1]; padding ignored. token-mean over 5 tokens.
    expected = (-1.28 - 1.0 - 0.9 + 0.8 + 1.1) / 5
    np.testing.assert_allclose(loss, expected, atol=1e-6)
    np.testing.assert_allclose(m["clip_frac_high"], 1 / 5, atol=1e-6)  # 1.5 > 1.28 with A > 0
    np.testing.assert_allclose(m["clip_frac_low"], 1 / 5, atol=1e-6)  # 0.5 < 0.8 with A < 0


def test_policy_loss_aggregations_hand_computed():
    logp, old, adv, mask = _loss_inputs()
    seq = gl.policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-mean")[0]
    np.testing.assert_allclose(seq, ((-1.28 - 1.0 - 0.9) / 3 + (0.8 + 1.1) / 2) / 2, atol=1e-6)
    drgrpo = gl.policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-sum-norm")[0]
    np.testing.assert_allclose(drgrpo, (-1.28 - 1.0 - 0.9 + 0.8 + 1.1) / (2 * 3), atol=1e-6)
    shared = gl.policy_loss(logp, old, adv, mask, num_tokens=10.0)[0]
    np.testing.assert_allclose(shared, (-1.28 - 1.0 - 0.9 + 0.8 + 1.1) / 10, atol=1e-6)


def test_dual_clip_bounds_negative_advantage_loss():
    logp, old, adv, mask = _loss_inputs()
    mask = jnp.ones_like(mask)
    loss, m = gl.policy_loss(logp, old, adv, mask, dual_clip=3.0)
    # The A=-1 token with ratio 7 would cost 7; dual clip caps it at 3.
    expected = (-1.28 - 1.0 - 0.9 + 0.8 + 1.1 + 3.0) / 6
    np.testing.assert_allclose(loss, expected, atol=1e-6)
    np.testing.assert_allclose(m["clip_frac_dual"], 1 / 6, atol=1e-6)


def test_on_policy_gradient_is_advantage_weighted_logprob_gradient():
    # At rho = 1 the clipped loss has gradient -A * mask / count with respect to logp.
    logp = jnp.zeros((2, 2))
    adv, mask = jnp.array([0.5, -2.0]), jnp.array([[1, 1], [1, 0]])
    grad = jax.grad(lambda lp: gl.policy_loss(lp, jnp.zeros_like(lp), adv, mask)[0])(logp)
    np.testing.assert_allclose(grad, [[-0.5 / 3, -0.5 / 3], [2.0 / 3, 0.0]], atol=1e-6)


def test_clip_never_raises_the_objective_on_the_other_side():
    # A > 0 with ratio 0.5 (below 1 - eps_low) keeps the unclipped -0.5 (not -0.8), and A < 0 with ratio
    # 1.5 (above 1 + eps_high) keeps 1.5 (not 1.28): pessimistic min, so neither counts as clipped, and
    # both keep their gradient; the clipped sides (A > 0 above, A < 0 below) get none.
    logp = jnp.log(jnp.array([[0.5, 1.5], [1.5, 0.5]]))
    adv, mask = jnp.array([1.0, -1.0]), jnp.ones((2, 2))
    loss, m = gl.policy_loss(logp, jnp.zeros((2, 2)), adv, mask, eps_low=0.2, eps_high=0.28)
    np.testing.assert_allclose(loss, (-0.5 - 1.28 + 1.5 + 0.8) / 4, atol=1e-6)
    np.testing.assert_allclose([m["clip_frac_low"], m["clip_frac_high"]], [0.25, 0.25], atol=1e-6)
    grad = jax.grad(lambda lp: gl.policy_loss(lp, jnp.zeros((2, 2)), adv, mask)[0])(logp)
    # d(-r A)/d logp = -r A / 4 on the unclipped tokens.
    np.testing.assert_allclose(grad, [[-0.5 / 4, 0.0], [1.5 / 4, 0.0]], atol=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_with_shared_denominators_sum_to_the_minibatch_loss(mode):
    # Gradient accumulation in the trainer: each micro-batch divides by the minibatch's token / sequence
    # count, so the micro losses (and gradients) add up to the minibatch's.
    values = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [6.0, 0.0, 0.0], [7.0, 8.0, 9.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    whole = gl.aggregate(values, mask, mode)
    shared = dict(num_tokens=mask.sum(), num_seqs=4, norm_length=3)
    parts = gl.aggregate(values[:2], mask[:2], mode, **shared) + gl.aggregate(values[2:], mask[2:], mode, **shared)
    np.testing.assert_allclose(parts, whole, rtol=1e-6)
    hand = {"token-mean": 45 / 9, "seq-mean-token-mean": (2 + 4.5 + 6 + 8) / 4,
            "seq-mean-token-sum-norm": 45 / (4 * 3)}[mode]
    np.testing.assert_allclose(whole, hand, rtol=1e-6)
