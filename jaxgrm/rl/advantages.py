"""Group-relative advantages and Stepwise Advantage Masking (SAM), as pure array functions.

Rewards come as [B] with rows grouped prompt-major: B = num_prompts * G, row = prompt * G + g
(the sampler's order). Step verdicts are int codes [B, P]: 1 correct, 0 wrong, -1 unverifiable
(or the step is absent). Step spans are half-open token ranges [B, P, 2] into the completion.

SAM (method.md, OURS): a trace with A_i > 0 gets advantage 0 on the tokens of its wrong steps
(no reward for a wrong step that happened to end in the right answer); a trace with A_i < 0 gets
advantage 0 on the tokens of its correct steps (no punishment for a correct step inside a failed
trace). Answer tokens, unverifiable steps and tokens outside any step keep A_i.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp

from jaxgrm.masked import spans_to_mask

CORRECT, WRONG, UNVERIFIABLE = 1, 0, -1


class AdvantageMode(enum.StrEnum):
    STD = "std"  # (r - mean) / (std + eps), std over the group (ddof 0)
    MEAN = "mean"  # r - mean
    LEAVE_ONE_OUT = "loo"  # r - mean of the other G - 1 rewards


class SamMode(enum.StrEnum):
    OFF = "off"  # plain GRPO: every completion token gets A_i
    BOTH = "both"  # mask wrong steps of positive traces and correct steps of negative ones
    POSITIVE_ONLY = "positive"  # only mask wrong steps of traces with A_i > 0
    NEGATIVE_ONLY = "negative"  # only mask correct steps of traces with A_i < 0
    BONUS = "bonus"  # no mask: add +bonus to correct-step tokens, -bonus to wrong-step tokens


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    mode: AdvantageMode = AdvantageMode.STD
    eps: float = 1e-6
    sam: SamMode = SamMode.BOTH
    step_bonus: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "mode", AdvantageMode(self.mode))
        object.__setattr__(self, "sam", SamMode(self.sam))
        if self.eps < 0 or self.step_bonus < 0:
            raise ValueError(f"eps and step_bonus must be >= 0: {self}")


def group_advantages(rewards_B: jax.Array, group_size: int, cfg: AdvantageConfig) -> jax.Array:
    """Advantage per trace [B] from rewards [B] in groups of `group_size` consecutive rows."""
    if rewards_B.shape[0] % group_size:
        raise ValueError(f"batch {rewards_B.shape[0]} is not a multiple of G={group_size}")
    r = rewards_B.astype(jnp.float32).reshape(-1, group_size)
    mean = r.mean(axis=1, keepdims=True)
    if cfg.mode == AdvantageMode.STD:
        adv = (r - mean) / (r.std(axis=1, keepdims=True) + cfg.eps)
    elif cfg.mode == AdvantageMode.MEAN:
        adv = r - mean
    else:
        if group_size < 2:
            raise ValueError("leave-one-out advantages need G >= 2")
        adv = (r - mean) * group_size / (group_size - 1)
    return adv.reshape(-1)


def zero_variance_groups(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """[B] bool: the row's group has identical rewards (it carries no learning signal)."""
    r = rewards_B.reshape(-1, group_size)
    same = jnp.all(r == r[:, :1], axis=1)
    return jnp.repeat(same, group_size)


def token_advantages(
    adv_B: jax.Array,
    completion_mask_BT: jax.Array,
    step_spans_BP2: jax.Array,
    verdicts_BP: jax.Array,
    cfg: AdvantageConfig,
) -> tuple[jax.Array, jax.Array]:
    """Token advantages [B, T] and the SAM mask [B, T] (True where SAM zeroed a token).

    Tokens outside the completion get 0. With SamMode.OFF this is A_i on every completion token.
    """
    t = completion_mask_BT.shape[1]
    base = jnp.where(completion_mask_BT, adv_B[:, None], 0.0)
    in_step_BPT = spans_to_mask(step_spans_BP2, t) & completion_mask_BT[:, None, :]
    correct_BT = jnp.any(in_step_BPT & (verdicts_BP == CORRECT)[..., None], axis=1)
    wrong_BT = jnp.any(in_step_BPT & (verdicts_BP == WRONG)[..., None], axis=1)
    positive = (adv_B > 0)[:, None]
    negative = (adv_B < 0)[:, None]
    if cfg.sam == SamMode.OFF:
        masked = jnp.zeros_like(completion_mask_BT)
    elif cfg.sam == SamMode.BONUS:
        bonus = cfg.step_bonus * (correct_BT.astype(jnp.float32) - wrong_BT.astype(jnp.float32))
        return base + bonus, jnp.zeros_like(completion_mask_BT)
    else:
        masked = jnp.zeros_like(completion_mask_BT)
        if cfg.sam in (SamMode.BOTH, SamMode.POSITIVE_ONLY):
            masked = masked | (positive & wrong_BT)
        if cfg.sam in (SamMode.BOTH, SamMode.NEGATIVE_ONLY):
            masked = masked | (negative & correct_BT)
    return jnp.where(masked, 0.0, base), masked


def step_verdict_rates(verdicts_BP: jax.Array) -> dict[str, jax.Array]:
    """Per-step correct rate over verifiable steps, and the rate of traces with every verifiable
    step correct (at least one verified): the faithfulness numbers that SAM moves first."""
    verifiable = verdicts_BP != UNVERIFIABLE
    correct = verdicts_BP == CORRECT
    per_step = jnp.sum(correct, 0) / jnp.maximum(jnp.sum(verifiable, 0), 1)
    all_right = jnp.all(correct | ~verifiable, axis=1) & jnp.any(verifiable, axis=1)
    out = {f"step{p + 1}_acc": per_step[p] for p in range(verdicts_BP.shape[1])}
    out["all_steps_right"] = jnp.mean(all_right.astype(jnp.float32))
    return out
