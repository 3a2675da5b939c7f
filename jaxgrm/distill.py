"""Knowledge distillation: token-level logit KD as pure losses, and an objective for the train step.

Sequence-level KD needs no code of its own: sample traces from the teacher (`jaxgrm.sampling`),
keep them as ordinary SFT records (prompt + teacher response) and train the student on them with
`jaxgrm.train.sft` (masked cross-entropy on the teacher's response tokens).

Token-level KD matches the student's next-token distribution to the teacher's at every response
token. Teacher and student share the tokenizer (same V) and may differ in size: the caller runs
the teacher forward (`teacher_logits`, `jit_teacher`) and puts its output in the batch, so the
objective only ever sees the student model.

Layout. Logits come in the decoder's layout, logits_BTV[:, t] being the distribution of token
t + 1. Per-token values are shifted one place so they line up with the token they predict, as in
`token_logprobs` (value_BT[:, t] scores token t; 0 at t = 0), and the mask is `target_mask(batch)`:
prompt tokens, padding and the first token of each segment never count. Masking is a `where`, so
whatever the logits hold at positions that do not predict a response token (even huge values)
changes neither the loss nor its gradient.

Temperature tau. Both distributions are softmax(logits / tau). With `scale_by_t2` (default) the
divergence is multiplied by tau^2, as in Hinton et al. (2015): the gradient of the softened
divergence w.r.t. the logits shrinks roughly like 1 / tau^2, and the factor keeps its size
comparable across temperatures and against the cross-entropy term.

Teacher top-k. With 0 < k < V the support is the teacher's k most likely tokens (the order does
not depend on tau); *both* teacher and student logits are gathered on it and renormalised there
(log-softmax over the k entries), and the divergence is taken between these two k-way
distributions. This keeps every divergence finite (a reverse KL against a truncated teacher would
be infinite wherever the student puts mass off the support), and makes the sparse batch form
(`teacher_logprobs_BTK`, `teacher_ids_BTK`) give exactly the dense result. The cost: student mass
off the support is neither rewarded nor penalised; add `ce_weight > 0` where that matters.
k = 0 or k >= V means the full vocabulary.

Generalised JSD (GKD, Agarwal et al., 2024), with T the teacher and S the student:
    JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M),   M = beta T + (1 - beta) S.
For small beta it is about beta KL(T || S) (forward KL), near 1 about (1 - beta) KL(S || T)
(reverse KL). At beta = 0 and beta = 1 exactly, where the formula itself vanishes, we return those
limits without the vanishing factor: KL(T || S) and KL(S || T), as GKD implementations do. The
scale therefore jumps at the two endpoints; pick beta in (0, 1) to sweep smoothly.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrm.masked import masked_count, masked_sum
from jaxgrm.sampling import gather_logprobs
from jaxgrm.train.objectives import target_mask


class KDKind(enum.StrEnum):
    FORWARD_KL = "forward-kl"  # KL(teacher || student): mass-covering
    JSD = "jsd"  # generalised Jensen-Shannon, beta from the config


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """kind: the divergence. beta: teacher weight of the JSD mixture, in [0, 1] (JSD only).
    temperature > 0 softens both distributions; scale_by_t2 multiplies the divergence by its
    square. teacher_top_k: 0 = full vocabulary, else the teacher's top-k support (see the module
    docstring). ce_weight >= 0: weight of the hard-label cross-entropy (temperature 1) on the same
    tokens, added to the divergence per token."""

    kind: KDKind = KDKind.FORWARD_KL
    beta: float = 0.5
    temperature: float = 1.0
    scale_by_t2: bool = True
    teacher_top_k: int = 0
    ce_weight: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "kind", KDKind(self.kind))
        ok = 0.0 <= self.beta <= 1.0 and self.temperature > 0 and math.isfinite(self.temperature)
        if not (ok and self.teacher_top_k >= 0 and self.ce_weight >= 0):
            raise ValueError(f"invalid KDConfig {self}")


# ---- divergences over the last axis, from log-probabilities -----------------------------------
def _kl(logp_XV: jax.Array, logq_XV: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis; entries with p = 0 add exactly 0 (no 0 * log 0, even for
    -inf log-probs, in the value or the gradient)."""
    p = jnp.exp(logp_XV)
    keep = p > 0
    diff = jnp.where(keep, logp_XV, 0.0) - jnp.where(keep, logq_XV, 0.0)
    return jnp.sum(jnp.where(keep, p * diff, 0.0), axis=-1)


def _jsd(logp_s_XV: jax.Array, logp_t_XV: jax.Array, beta: float) -> jax.Array:
    if beta == 0.0:
        return _kl(logp_t_XV, logp_s_XV)
    if beta == 1.0:
        return _kl(logp_s_XV, logp_t_XV)
    log_m = jnp.logaddexp(math.log(beta) + logp_t_XV, math.log1p(-beta) + logp_s_XV)
    return beta * _kl(logp_t_XV, log_m) + (1.0 - beta) * _kl(logp_s_XV, log_m)


def _support_logprobs(student_XV, teacher_XV, temperature: float, teacher_top_k: int):
    """Tempered log-probs of student and teacher on the teacher's top-k support (or all of V)."""
    student_XV = student_XV.astype(jnp.float32)
    teacher_XV = teacher_XV.astype(jnp.float32)
    if student_XV.shape != teacher_XV.shape:
        raise ValueError(f"student {student_XV.shape} and teacher {teacher_XV.shape} differ")
    if 0 < teacher_top_k < teacher_XV.shape[-1]:
        _, ids = jax.lax.top_k(teacher_XV, teacher_top_k)
        student_XV = jnp.take_along_axis(student_XV, ids, axis=-1)
        teacher_XV = jnp.take_along_axis(teacher_XV, ids, axis=-1)
    return (
        jax.nn.log_softmax(student_XV / temperature, axis=-1),
        jax.nn.log_softmax(teacher_XV / temperature, axis=-1),
    )


def forward_kl(
    student_BTV: jax.Array,
    teacher_BTV: jax.Array,
    temperature: float = 1.0,
    teacher_top_k: int = 0,
    scale_by_t2: bool = True,
) -> jax.Array:
    """Per-position KL(p_teacher || p_student) of two logit arrays [..., V] -> [...] float32."""
    logp_s, logp_t = _support_logprobs(student_BTV, teacher_BTV, temperature, teacher_top_k)
    scale = temperature**2 if scale_by_t2 else 1.0
    return scale * _kl(logp_t, logp_s)


def generalized_jsd(
    student_BTV: jax.Array,
    teacher_BTV: jax.Array,
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_top_k: int = 0,
    scale_by_t2: bool = True,
) -> jax.Array:
    """Per-position JSD_beta (module docstring) of two logit arrays [..., V] -> [...] float32.
    beta is a Python float in [0, 1]; 0 and 1 give forward and reverse KL exactly."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    logp_s, logp_t = _support_logprobs(student_BTV, teacher_BTV, temperature, teacher_top_k)
    scale = temperature**2 if scale_by_t2 else 1.0
    return scale * _jsd(logp_s, logp_t, beta)


def kd_per_token(
    student_BTV: jax.Array, teacher_BTV: jax.Array, cfg: KDConfig, teacher_top_k: int | None = None
) -> jax.Array:
    """The configured divergence per position [..., V] -> [...]; `teacher_top_k` overrides the
    config's (the sparse path passes 0: its inputs already live on the support)."""
    k = cfg.teacher_top_k if teacher_top_k is None else teacher_top_k
    if cfg.kind == KDKind.FORWARD_KL:
        return forward_kl(student_BTV, teacher_BTV, cfg.temperature, k, cfg.scale_by_t2)
    return generalized_jsd(student_BTV, teacher_BTV, cfg.beta, cfg.temperature, k, cfg.scale_by_t2)


def _to_targets(x_BT1: jax.Array) -> jax.Array:
    """[B, T-1] values computed from logits[:, :-1] -> [B, T] aligned with the token they score."""
    return jnp.pad(x_BT1, ((0, 0), (1, 0)))


def distill_loss(
    student_logits_BTV: jax.Array,
    tokens_BT: jax.Array,
    mask_BT: jax.Array,
    cfg: KDConfig,
    *,
    teacher_logits_BTV: jax.Array | None = None,
    teacher_logprobs_BTK: jax.Array | None = None,
    teacher_ids_BTK: jax.Array | None = None,
):
    """((loss sum, denominator), metrics as (sum, denominator) pairs) of logit KD.

    Logits are in the decoder's layout (position t predicts token t + 1); mask_BT is aligned with
    the tokens (`target_mask`). The teacher is given either as full logits [B, T, V] or sparsely
    as its top-k log-probs [B, T, K] (temperature 1, full-vocabulary normalisation or any other:
    only differences within a row matter) at token ids [B, T, K], in the same layout.
    Per token: divergence + ce_weight * cross-entropy; metrics "kd", "ce", "tokens".
    """
    student = student_logits_BTV[:, :-1].astype(jnp.float32)
    if teacher_ids_BTK is not None:
        if teacher_logprobs_BTK is None:
            raise ValueError("teacher_ids_BTK needs teacher_logprobs_BTK")
        sub = jnp.take_along_axis(student, teacher_ids_BTK[:, :-1], axis=-1)
        kd = kd_per_token(sub, teacher_logprobs_BTK[:, :-1], cfg, teacher_top_k=0)
    elif teacher_logits_BTV is not None:
        kd = kd_per_token(student, teacher_logits_BTV[:, :-1], cfg)
    else:
        raise ValueError("distillation needs teacher_logits_BTV or teacher_ids_BTK")
    kd_BT = _to_targets(kd)
    ce_BT = -_to_targets(gather_logprobs(student, tokens_BT[:, 1:]))
    mask = mask_BT.astype(bool)
    den = masked_count(mask)
    per_token = kd_BT + cfg.ce_weight * ce_BT if cfg.ce_weight > 0 else kd_BT
    metrics = {
        "kd": (masked_sum(kd_BT, mask), den),
        "ce": (masked_sum(ce_BT, mask), den),
        "tokens": (den, jnp.ones(())),
    }
    return (masked_sum(per_token, mask), den), metrics


@dataclasses.dataclass(frozen=True)
class LogitDistillation:
    """Token-level KD objective for `jit_train_step`: `objective(student, batch)`.

    The batch carries, besides tokens_BT, segment_ids_BT and loss_mask_BT (see
    `jaxgrm.train.objectives`), either
        teacher_logits_BTV    float32 [B, T, V] the teacher's forward on tokens_BT
    or the sparse form (which then takes precedence)
        teacher_logprobs_BTK  float32 [B, T, K] the teacher's top-k log-probs
        teacher_ids_BTK       int32   [B, T, K] their token ids
    both in the decoder's layout (position t predicts token t + 1), e.g. from `jit_teacher`.
    """

    config: KDConfig = KDConfig()

    def __call__(self, model, batch: Mapping[str, jax.Array]):
        logits = model.forward(batch["tokens_BT"], batch["segment_ids_BT"])
        return distill_loss(
            logits,
            batch["tokens_BT"],
            target_mask(batch),
            self.config,
            teacher_logits_BTV=batch.get("teacher_logits_BTV"),
            teacher_logprobs_BTK=batch.get("teacher_logprobs_BTK"),
            teacher_ids_BTK=batch.get("teacher_ids_BTK"),
        )


# ---- the teacher side -------------------------------------------------------------------------
def teacher_logits(teacher_model, tokens_BT: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
    """The teacher's logits [B, T, V] float32 (no gradient), for `teacher_logits_BTV`."""
    return jax.lax.stop_gradient(teacher_model.forward(tokens_BT, segment_ids_BT)).astype(
        jnp.float32
    )


def teacher_top_k(teacher_model, tokens_BT: jax.Array, segment_ids_BT: jax.Array, k: int):
    """The teacher's k most likely next tokens: (log-probs [B, T, K] float32, ids [B, T, K])."""
    logp = jax.nn.log_softmax(teacher_logits(teacher_model, tokens_BT, segment_ids_BT), axis=-1)
    logp_BTK, ids_BTK = jax.lax.top_k(logp, k)
    return logp_BTK, ids_BTK.astype(jnp.int32)


def jit_teacher(graphdef: nnx.GraphDef, top_k: int = 0):
    """Jitted `fn(params, tokens_BT, segment_ids_BT)` giving the batch entries for the teacher:
    {"teacher_logits_BTV"} when top_k = 0, else {"teacher_logprobs_BTK", "teacher_ids_BTK"}.
    The weights are an argument, not closed over, so a new teacher needs no recompile."""

    def fn(params, tokens_BT, segment_ids_BT):
        model = nnx.merge(graphdef, params)
        if top_k > 0:
            logp, ids = teacher_top_k(model, tokens_BT, segment_ids_BT, top_k)
            return {"teacher_logprobs_BTK": logp, "teacher_ids_BTK": ids}
        return {"teacher_logits_BTV": teacher_logits(model, tokens_BT, segment_ids_BT)}

    return jax.jit(fn)
