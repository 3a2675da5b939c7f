"""GRPO with Stepwise Advantage Masking: advantages, losses and the learner."""

from jaxgrm.rl.advantages import (
    AdvantageConfig,
    AdvantageMode,
    SamMode,
    group_advantages,
    token_advantages,
    zero_variance_groups,
)
from jaxgrm.rl.losses import Aggregation, KLEstimator, PolicyLossConfig, policy_loss

__all__ = [
    "AdvantageConfig",
    "AdvantageMode",
    "Aggregation",
    "KLEstimator",
    "PolicyLossConfig",
    "SamMode",
    "group_advantages",
    "policy_loss",
    "token_advantages",
    "zero_variance_groups",
]
