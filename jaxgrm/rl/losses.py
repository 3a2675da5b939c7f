"""Policy losses as pure functions of arrays: clipped surrogate, KL to a reference, aggregation.

Every aggregate is returned as (sum, denominator). Callers add sums and denominators over
micro-batches and devices and divide once, so accumulation and sharding give exactly the
full-batch value:

- token-mean: sum over all completion tokens of the batch / number of those tokens.
- sequence-mean-token-mean: each sequence's token mean, summed / number of sequences (with at
  least one token). A sequence never spans micro-batches, so its mean is local and exact.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp

from jaxgrm.masked import masked_count, masked_sum, safe_divide


class Aggregation(enum.StrEnum):
    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_MEAN = "sequence-mean-token-mean"


class KLEstimator(enum.StrEnum):
    K1 = "k1"  # log pi - log pi_ref (unbiased, high variance, can be negative)
    K2 = "k2"  # (log pi - log pi_ref)^2 / 2
    K3 = "k3"  # exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (unbiased, >= 0)


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """clip_low/clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (a separate upper
    clip is the "clip-higher" variant). kl_coef = 0 means no reference model."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = KLEstimator.K3
    aggregation: Aggregation = Aggregation.TOKEN_MEAN

    def __post_init__(self):
        object.__setattr__(self, "kl_estimator", KLEstimator(self.kl_estimator))
        object.__setattr__(self, "aggregation", Aggregation(self.aggregation))
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0 and self.kl_coef >= 0):
            raise ValueError(f"invalid PolicyLossConfig {self}")


def clipped_surrogate(
    logp_BT: jax.Array, old_logp_BT: jax.Array, adv_BT: jax.Array, clip_low: float, clip_high: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token loss -min(r A, clip(r) A) with r = exp(logp - old_logp), and where clipping bit."""
    ratio = jnp.exp(logp_BT - old_logp_BT)
    unclipped = ratio * adv_BT
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv_BT
    return -jnp.minimum(unclipped, clipped), clipped < unclipped


def kl_to_reference(logp_BT: jax.Array, ref_logp_BT: jax.Array, kind: KLEstimator) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi."""
    d = logp_BT - ref_logp_BT
    if kind == KLEstimator.K1:
        return d
    if kind == KLEstimator.K2:
        return 0.5 * d * d
    return jnp.exp(-d) + d - 1.0


def aggregate(values_BT: jax.Array, mask_BT: jax.Array, how: Aggregation):
    """(sum, denominator) of a per-token quantity under `how` (see the module docstring)."""
    if how == Aggregation.TOKEN_MEAN:
        return masked_sum(values_BT, mask_BT), masked_count(mask_BT)
    per_seq = safe_divide(masked_sum(values_BT, mask_BT, axis=1), masked_count(mask_BT, axis=1))
    return per_seq.sum(), jnp.sum(jnp.any(mask_BT, axis=1).astype(jnp.float32))


def policy_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    adv_BT: jax.Array,
    mask_BT: jax.Array,
    cfg: PolicyLossConfig,
    ref_logp_BT: jax.Array | None = None,
) -> tuple[tuple[jax.Array, jax.Array], dict[str, tuple[jax.Array, jax.Array]]]:
    """GRPO objective: ((loss sum, denominator), metrics as (sum, denominator) pairs).

    mask_BT selects the tokens that carry loss (completion tokens of kept groups). Tokens zeroed
    by SAM stay in the mask with advantage 0: they add no gradient, but still count in the
    denominator, as in GRPO where such tokens are simply uninformative.
    """
    surrogate, clipped = clipped_surrogate(
        logp_BT, old_logp_BT, adv_BT, cfg.clip_low, cfg.clip_high
    )
    per_token = surrogate
    metrics = {"clip_frac": aggregate(clipped.astype(jnp.float32), mask_BT, cfg.aggregation)}
    if cfg.kl_coef > 0:
        if ref_logp_BT is None:
            raise ValueError("kl_coef > 0 needs reference log-probabilities")
        kl = kl_to_reference(logp_BT, ref_logp_BT, cfg.kl_estimator)
        per_token = per_token + cfg.kl_coef * kl
        metrics["kl"] = aggregate(kl, mask_BT, cfg.aggregation)
    metrics["ratio"] = aggregate(jnp.exp(logp_BT - old_logp_BT), mask_BT, cfg.aggregation)
    return aggregate(per_token, mask_BT, cfg.aggregation), metrics
