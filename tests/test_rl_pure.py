"""The pure RL functions on hand-derived numbers (derivations in the comments)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrm.masked import segment_sum, spans_to_mask
from jaxgrm.rl.advantages import (
    CORRECT,
    UNVERIFIABLE,
    WRONG,
    AdvantageConfig,
    group_advantages,
    step_verdict_rates,
    token_advantages,
    zero_variance_groups,
)
from jaxgrm.rl.losses import (
    Aggregation,
    PolicyLossConfig,
    aggregate,
    clipped_surrogate,
    kl_to_reference,
    policy_loss,
)

C, W, U = CORRECT, WRONG, UNVERIFIABLE


def test_group_advantages_by_hand():
    r = jnp.array([1.0, 0, 0, 1, 1, 1, 1, 1])
    # Group 1: mean 0.5, std (ddof 0) 0.5 -> (r - 0.5) / 0.5 = +-1. Group 2: all equal -> 0.
    std = group_advantages(r, 4, AdvantageConfig(mode="std", eps=0.0 + 1e-9))
    np.testing.assert_allclose(std, [1, -1, -1, 1, 0, 0, 0, 0], atol=1e-6)
    mean = group_advantages(r, 4, AdvantageConfig(mode="mean"))
    np.testing.assert_allclose(mean, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # Leave-one-out: r_0 - mean(r_1..r_3) = 1 - 1/3 = 2/3; r_1 - mean(1, 0, 1) = -2/3.
    loo = group_advantages(r, 4, AdvantageConfig(mode="loo"))
    np.testing.assert_allclose(loo, [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_array_equal(zero_variance_groups(r, 4), [False] * 4 + [True] * 4)
    with pytest.raises(ValueError, match="multiple of G"):
        group_advantages(r, 3, AdvantageConfig())


# Two traces, T = 10. Completion = tokens 0..8; step1 = [0, 3), step2 = [3, 6), step3 = [6, 8),
# the answer is token 8, token 9 is padding.
SPANS = jnp.array([[[0, 3], [3, 6], [6, 8]]] * 2)
COMPLETION = jnp.array([[True] * 9 + [False]] * 2)
ADV = jnp.array([1.0, -1.0])
VERDICTS = jnp.array([[C, W, U], [C, W, C]])


def test_sam_both_by_hand():
    adv, masked = token_advantages(ADV, COMPLETION, SPANS, VERDICTS, AdvantageConfig(sam="both"))
    # Trace 0 (A > 0): its wrong step2 (tokens 3-5) is zeroed; unverifiable step3 and the answer
    # keep +1. Trace 1 (A < 0): its correct steps 1 and 3 (tokens 0-2, 6-7) are zeroed; the wrong
    # step2 and the answer keep -1. Padding is 0.
    np.testing.assert_array_equal(adv[0], [1, 1, 1, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(adv[1], [0, 0, 0, -1, -1, -1, 0, 0, -1, 0])
    assert int(masked.sum()) == 3 + 5


def test_sam_variants_by_hand():
    pos, _ = token_advantages(ADV, COMPLETION, SPANS, VERDICTS, AdvantageConfig(sam="positive"))
    np.testing.assert_array_equal(pos[1], [-1] * 9 + [0])  # negative trace untouched
    np.testing.assert_array_equal(pos[0], [1, 1, 1, 0, 0, 0, 1, 1, 1, 0])
    neg, _ = token_advantages(ADV, COMPLETION, SPANS, VERDICTS, AdvantageConfig(sam="negative"))
    np.testing.assert_array_equal(neg[0], [1] * 9 + [0])  # positive trace untouched
    bonus, masked = token_advantages(
        ADV, COMPLETION, SPANS, VERDICTS, AdvantageConfig(sam="bonus", step_bonus=0.1)
    )
    # Trace 0: +0.1 on the correct step1, -0.1 on the wrong step2, unverifiable step3 unchanged.
    np.testing.assert_allclose(bonus[0], [1.1] * 3 + [0.9] * 3 + [1, 1, 1, 0], atol=1e-6)
    # Trace 1: -1 + 0.1 on steps 1 and 3, -1 - 0.1 on step2.
    np.testing.assert_allclose(bonus[1], [-0.9] * 3 + [-1.1] * 3 + [-0.9] * 2 + [-1, 0], atol=1e-6)
    assert not masked.any()


def test_sam_equals_grpo_when_all_steps_correct_and_advantages_positive():
    adv = jnp.array([0.7, 1.3])
    verdicts = jnp.full((2, 3), C)
    sam, _ = token_advantages(adv, COMPLETION, SPANS, verdicts, AdvantageConfig(sam="both"))
    grpo, _ = token_advantages(adv, COMPLETION, SPANS, verdicts, AdvantageConfig(sam="off"))
    np.testing.assert_array_equal(sam, grpo)


def test_clipped_surrogate_by_hand():
    old = jnp.zeros(4)
    logp = jnp.log(jnp.array([1.5, 0.5, 0.5, 1.0]))
    adv = jnp.array([2.0, 2.0, -2.0, 0.0])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    # r=1.5, A=2: min(3.0, 1.2*2=2.4) = 2.4, clipped.  r=0.5, A=2: min(1.0, 0.8*2=1.6) = 1.0.
    # r=0.5, A=-2: min(-1.0, 0.8*-2=-1.6) = -1.6, clipped.  A=0: 0.
    np.testing.assert_allclose(loss, [-2.4, -1.0, 1.6, 0.0], atol=1e-6)
    np.testing.assert_array_equal(clipped, [True, False, True, False])
    loss, _ = clipped_surrogate(logp[:1], old[:1], adv[:1], 0.2, 0.28)  # clip-higher: 1.28*2
    np.testing.assert_allclose(loss, [-2.56], atol=1e-6)


def test_kl_estimators_by_hand():
    logp, ref = jnp.array([0.5]), jnp.array([0.0])  # d = 0.5
    np.testing.assert_allclose(kl_to_reference(logp, ref, "k1"), [0.5])
    np.testing.assert_allclose(kl_to_reference(logp, ref, "k2"), [0.125])
    # k3 = exp(-d) + d - 1 = 0.6065307 + 0.5 - 1
    np.testing.assert_allclose(kl_to_reference(logp, ref, "k3"), [0.1065307], atol=1e-6)


def test_aggregation_by_hand():
    v = jnp.array([[1.0, 2, 3, 0], [4, 0, 0, 0], [9, 9, 9, 9]])
    m = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    s, d = aggregate(v, m, Aggregation.TOKEN_MEAN)
    assert (float(s), float(d)) == (10.0, 4.0)  # (1+2+3+4) over 4 tokens
    s, d = aggregate(v, m, Aggregation.SEQ_MEAN_TOKEN_MEAN)
    assert (float(s), float(d)) == (6.0, 2.0)  # means 2 and 4; the empty row counts nowhere


@pytest.mark.parametrize("how", list(Aggregation))
def test_accumulation_over_micro_batches_equals_full_batch(how):
    k = jax.random.split(jax.random.key(0), 5)
    b, t = 8, 12
    logp = jax.random.normal(k[0], (b, t)) * 0.1 - 2
    old = logp + jax.random.normal(k[1], (b, t)) * 0.1
    ref = logp + jax.random.normal(k[2], (b, t)) * 0.1
    adv = jax.random.normal(k[3], (b, t))
    mask = jax.random.uniform(k[4], (b, t)) < 0.7
    cfg = PolicyLossConfig(kl_coef=0.05, aggregation=how)

    def loss_sum(lp, sl):
        (s, d), _ = policy_loss(lp, old[sl], adv[sl], mask[sl], cfg, ref[sl])
        return s, d

    full_s, full_d = loss_sum(logp, slice(None))
    grad_full = jax.grad(lambda lp: loss_sum(lp, slice(None))[0] / full_d)(logp)
    sums, dens, grads = [], [], []
    for i in range(4):
        sl = slice(2 * i, 2 * i + 2)
        s, d = loss_sum(logp[sl], sl)
        sums.append(s)
        dens.append(d)
        grads.append(jax.grad(lambda lp, sl=sl: loss_sum(lp, sl)[0])(logp[sl]))
    den = sum(dens)
    np.testing.assert_allclose(sum(sums) / den, full_s / full_d, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jnp.concatenate(grads) / den, grad_full, rtol=1e-5, atol=1e-8)


def test_masked_and_sam_zeroed_tokens_get_exactly_zero_gradient():
    adv, sam_masked = token_advantages(
        ADV, COMPLETION, SPANS, VERDICTS, AdvantageConfig(sam="both")
    )
    old = jnp.full((2, 10), -1.0)
    logp0 = jnp.full((2, 10), -0.9)
    cfg = PolicyLossConfig()

    def f(lp):
        (s, d), _ = policy_loss(lp, old, adv, COMPLETION, cfg)
        return s / d

    g = jax.grad(f)(logp0)
    zero = sam_masked | ~COMPLETION
    assert bool(jnp.all(g[zero] == 0.0))
    assert bool(jnp.all(g[~zero] != 0.0))


def test_verdict_rates_and_masks():
    rates = step_verdict_rates(jnp.array([[C, W, U], [C, C, C], [U, U, U]]))
    # step1: 2/2 correct; step2: 1 of 2 verifiable; step3: 1 of 1. All-right: row 1 only
    # (row 0 has a wrong step, row 2 verified nothing): 1/3.
    np.testing.assert_allclose(
        [rates["step1_acc"], rates["step2_acc"], rates["step3_acc"]], [1, 0.5, 1]
    )
    np.testing.assert_allclose(rates["all_steps_right"], 1 / 3)
    m = spans_to_mask(jnp.array([[[1, 3], [0, 0]]]), 4)
    np.testing.assert_array_equal(m[0], [[0, 1, 1, 0], [0, 0, 0, 0]])
    s = segment_sum(jnp.array([[1.0, 2, 3, 4]]), jnp.array([[0, 1, 1, 2]]), 3)
    np.testing.assert_array_equal(s, [[1, 5, 4]])
