"""Objectives the train step optimises: each maps (model, batch) to a (sum, denominator) loss.

An objective is a frozen (hashable) dataclass, so the jitted train step can take it as a static
argument. Batches are mappings of arrays whose leading dimension is B:

    tokens_BT       int32   prompt + response tokens, right-padded or packed
    segment_ids_BT  int32   1, 2, ... per example in the row; 0 = padding
    loss_mask_BT    bool    tokens that carry loss (SFT: response tokens)

and for the policy-gradient objective also

    old_logp_BT     float32 log-probs of the tokens under the sampling policy
    adv_BT          float32 token advantages (SAM already applied)
    ref_logp_BT     float32 reference-policy log-probs (only when kl_coef > 0)

Log-probabilities are aligned with the tokens they score: logp_BT[:, t] = log p(token t | < t);
position 0 of each row is never a target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxgrm.masked import masked_count, masked_sum
from jaxgrm.model.decoder import constrain_batch
from jaxgrm.rl.losses import PolicyLossConfig, policy_loss
from jaxgrm.sampling import gather_logprobs

# Tokens per chunk of the vocabulary projection in `token_logprobs` (all rows x a slice of T).
LOGPROB_CHUNK_TOKENS = 1024
# `token_logprobs` keeps the logits for the backward pass while all B x T x V of them (float32)
# fit in this many bytes, and recomputes each chunk's there past it.
LOGPROB_REMAT_BYTES = 256 * 2**20


def chunked_logprobs(
    logits_fn,
    hidden_BTD: jax.Array,
    targets_BT: jax.Array,
    chunk_tokens: int,
    remat: bool = True,
):
    """gather_logprobs(logits_fn(hidden), targets) as a scan over slices of T (all B rows each,
    so a batch split over devices stays split). With `remat` each slice's logits are recomputed
    in the backward pass (jax.checkpoint), so [B, T, V] is never held: peak memory for the
    logits drops from B*T*V to about chunk_tokens*V floats, for one more forward pass of the
    vocabulary projection (about 4% of the 32 x 128 benchmark step on the CPU, by profile)."""
    b, t, _ = hidden_BTD.shape
    ct = max(1, min(t, chunk_tokens // max(b, 1)))
    n = -(-t // ct)
    pad = n * ct - t
    h = constrain_batch(jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0))))
    tg = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    h = h.reshape(b, n, ct, -1).swapaxes(0, 1)  # [n, B, ct, D]
    tg = tg.reshape(b, n, ct).swapaxes(0, 1)

    def one(args):
        h_chunk, t_chunk = args
        return constrain_batch(gather_logprobs(logits_fn(constrain_batch(h_chunk)), t_chunk))

    logp = jax.lax.map(jax.checkpoint(one) if remat else one, (h, tg))  # [n, B, ct]
    return logp.swapaxes(0, 1).reshape(b, n * ct)[:, :t]


def token_logprobs(
    model,
    tokens_BT: jax.Array,
    segment_ids_BT: jax.Array,
    chunk_tokens: int | None = None,
    remat_bytes: int | None = None,
) -> jax.Array:
    """log p(token t | tokens < t) for t >= 1, 0 at t = 0: [B, T] float32. The vocabulary
    projection runs in chunks of about `chunk_tokens` tokens (default LOGPROB_CHUNK_TOKENS),
    rematerialised when the whole batch's logits exceed `remat_bytes` (default
    LOGPROB_REMAT_BYTES)."""
    hidden = model.hidden(tokens_BT, segment_ids_BT)
    chunk = LOGPROB_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    budget = LOGPROB_REMAT_BYTES if remat_bytes is None else remat_bytes
    b, t = tokens_BT.shape
    remat = 4 * b * (t - 1) * model.cfg.vocab_size > budget
    logp = chunked_logprobs(model.logits, hidden[:, :-1], tokens_BT[:, 1:], chunk, remat)
    return jnp.pad(logp, ((0, 0), (1, 0)))


def target_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
    """loss_mask restricted to tokens that have a predecessor in their own segment."""
    seg = batch["segment_ids_BT"]
    same = jnp.pad(seg[:, 1:] == seg[:, :-1], ((0, 0), (1, 0)))
    return batch["loss_mask_BT"].astype(bool) & same & (seg != 0)


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """Masked next-token cross-entropy (SFT, sequence-level distillation)."""

    def __call__(self, model, batch):
        logp = token_logprobs(model, batch["tokens_BT"], batch["segment_ids_BT"])
        mask = target_mask(batch)
        loss = (-masked_sum(logp, mask), masked_count(mask))
        return loss, {"tokens": (masked_count(mask), jnp.ones(()))}


@dataclasses.dataclass(frozen=True)
class PolicyGradient:
    """The GRPO/SAM clipped surrogate (+ optional KL) on sampled completions."""

    config: PolicyLossConfig = PolicyLossConfig()

    def __call__(self, model, batch):
        logp = token_logprobs(model, batch["tokens_BT"], batch["segment_ids_BT"])
        mask = target_mask(batch)
        loss, metrics = policy_loss(
            logp,
            batch["old_logp_BT"],
            batch["adv_BT"],
            mask,
            self.config,
            batch.get("ref_logp_BT"),
        )
        # Entropy proxy: mean negative log-prob of the sampled tokens under the current policy.
        metrics["neg_logp"] = (-masked_sum(logp, mask), masked_count(mask))
        return loss, metrics
