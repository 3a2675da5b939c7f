"""Rollouts: prompts -> G traces from the sampler -> parse -> rewards and step verdicts -> the
token-level training batch with (SAM) advantages. Also greedy evaluation of a policy.

All host-side work is numpy; the only device work is the sampler call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jaxgrm.data.schema import STEP_NAMES, RelevanceExample
from jaxgrm.evaluate import Report, evaluate
from jaxgrm.prompts import ParsedTrace, parse_ids
from jaxgrm.rewards import score_batch
from jaxgrm.rl.advantages import (
    AdvantageConfig,
    group_advantages,
    token_advantages,
    zero_variance_groups,
)
from jaxgrm.sampling import Sampler
from jaxgrm.tokenizer import Tokenizer


@dataclasses.dataclass
class Rollout:
    """B = prompts x G rows (prompt-major). Arrays are numpy.

    prompt_tokens_BL / prompt_mask_BL: left-padded prompts. tokens_BM / mask_BM / logprobs_BM:
    completions, their mask and sampling log-probs. rewards_B: outcome rewards. verdicts_BP:
    step verdict codes (1 correct, 0 wrong, -1 unverifiable). spans_BP2: step spans in completion
    token indices ((0, 0) when a step is not well formed). examples: the example of each row.
    """

    prompt_tokens_BL: np.ndarray
    prompt_mask_BL: np.ndarray
    tokens_BM: np.ndarray
    mask_BM: np.ndarray
    logprobs_BM: np.ndarray
    parsed: list[ParsedTrace]
    rewards_B: np.ndarray
    verdicts_BP: np.ndarray
    spans_BP2: np.ndarray
    examples: list[RelevanceExample]


def rollout(
    sampler: Sampler,
    params,
    tokenizer: Tokenizer,
    examples: Sequence[RelevanceExample],
    prompt_ids: Sequence[Sequence[int]],
    key: jax.Array,
) -> Rollout:
    """Sample G = sampler.config.num_samples traces per example and score them."""
    out = sampler(params, prompt_ids, key)
    tokens, mask = np.asarray(out.tokens_BM), np.asarray(out.mask_BM)
    g = sampler.config.num_samples
    rows = [ex for ex in examples for _ in range(g)]
    parsed = [
        parse_ids(t[m].tolist(), tokenizer, scale=ex.scale)
        for t, m, ex in zip(tokens, mask, rows, strict=True)
    ]
    rewards, verdicts = score_batch(parsed, rows)
    spans = np.zeros((len(rows), len(STEP_NAMES), 2), np.int32)
    for i, p in enumerate(parsed):
        for j, name in enumerate(STEP_NAMES):
            if name in p.step_spans:
                spans[i, j] = p.step_spans[name]
    return Rollout(
        prompt_tokens_BL=np.asarray(out.prompt_tokens_BL),
        prompt_mask_BL=np.asarray(out.prompt_mask_BL),
        tokens_BM=tokens,
        mask_BM=mask,
        logprobs_BM=np.asarray(out.logprobs_BM),
        parsed=parsed,
        rewards_B=np.asarray(rewards, np.float32),
        verdicts_BP=np.asarray(verdicts, np.int32),
        spans_BP2=spans,
        examples=rows,
    )


def training_batch(
    r: Rollout, group_size: int, cfg: AdvantageConfig, filter_zero_variance: bool
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The policy-gradient batch over prompt + completion tokens [B, L + M], and its stats.

    Groups whose rewards are all equal carry no signal; with `filter_zero_variance` their rows
    get no loss tokens at all (rather than zero advantage), so they do not dilute the mean.
    """
    adv_B = np.asarray(group_advantages(r.rewards_B, group_size, cfg))
    adv_BM, sam_BM = (
        np.asarray(x) for x in token_advantages(adv_B, r.mask_BM, r.spans_BP2, r.verdicts_BP, cfg)
    )
    loss_mask = r.mask_BM.copy()
    zero_var = np.asarray(zero_variance_groups(r.rewards_B, group_size))
    if filter_zero_variance:
        loss_mask &= ~zero_var[:, None]
    b, length = r.prompt_tokens_BL.shape
    pad = np.zeros((b, length), np.float32)
    batch = {
        "tokens_BT": np.concatenate([r.prompt_tokens_BL, r.tokens_BM], 1).astype(np.int32),
        "segment_ids_BT": np.concatenate([r.prompt_mask_BL, r.mask_BM], 1).astype(np.int32),
        "loss_mask_BT": np.concatenate([np.zeros((b, length), bool), loss_mask], 1),
        "old_logp_BT": np.concatenate([pad, r.logprobs_BM], 1).astype(np.float32),
        "adv_BT": np.concatenate([pad, adv_BM], 1).astype(np.float32),
    }
    tokens = max(int(r.mask_BM.sum()), 1)
    stats = {
        "sam_masked_frac": float((sam_BM & r.mask_BM).sum() / tokens),
        "zero_variance_frac": float(zero_var.mean()),
        "adv_abs_mean": float(np.abs(adv_B).mean()),
    }
    return batch, stats


def rollout_stats(r: Rollout) -> dict[str, float]:
    """Reward, validity, completion length and per-step verifier rates of a rollout."""
    v = r.verdicts_BP
    out = {
        "reward_mean": float(r.rewards_B.mean()),
        "reward_std": float(r.rewards_B.std()),
        "invalid_rate": float(np.mean([p.grade is None for p in r.parsed])),
        "completion_len": float(r.mask_BM.sum(1).mean()),
    }
    for j, name in enumerate(STEP_NAMES):
        verifiable = v[:, j] != -1
        out[f"{name}_verified"] = float(verifiable.mean())
        out[f"{name}_acc"] = float((v[:, j] == 1).sum() / max(verifiable.sum(), 1))
    right = np.all((v == 1) | (v == -1), axis=1) & np.any(v != -1, axis=1)
    out["all_steps_right"] = float(right.mean())
    return out


def evaluate_policy(
    sampler: Sampler,
    params,
    tokenizer: Tokenizer,
    examples: Sequence[RelevanceExample],
    prompt_ids: Sequence[Sequence[int]],
    key: jax.Array,
    batch_size: int = 64,
) -> Report:
    """Decode every example once with `sampler` (configure it greedy, G = 1) and report the
    relevance metrics plus step accuracy on the examples' own grade scale."""
    if sampler.config.num_samples != 1:
        raise ValueError("evaluation samples one trace per example (num_samples=1)")
    preds, verdicts = [], []
    for start in range(0, len(examples), batch_size):
        chunk = slice(start, start + batch_size)
        r = rollout(sampler, params, tokenizer, examples[chunk], prompt_ids[chunk], key)
        preds += [p.grade for p in r.parsed]
        verdicts.append(r.verdicts_BP)
    scales = {ex.scale for ex in examples}
    if len(scales) != 1:
        raise ValueError(f"evaluate one grade scale at a time, got {sorted(scales)}")
    grades = examples[0].grade_scale.grades
    return evaluate(
        preds,
        [ex.label for ex in examples],
        grades,
        qids=[ex.qid for ex in examples],
        step_verdicts=np.concatenate(verdicts),
    )
