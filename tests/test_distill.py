import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgrm.distill import (
    KDConfig,
    KDKind,
    LogitDistillation,
    distill_loss,
    forward_kl,
    generalized_jsd,
    jit_teacher,
    kd_per_token,
)
from jaxgrm.model import ModelConfig, create_model
from jaxgrm.train import TrainState, jit_train_step
from jaxgrm.train.objectives import target_mask

# Teacher p and student q over 3 tokens; logits are their logs.
P = np.array([0.5, 0.25, 0.25])
Q = np.array([0.8, 0.1, 0.1])
LOG_P, LOG_Q = jnp.log(P)[None, None], jnp.log(Q)[None, None]  # [1, 1, 3]


def _kl(a, b):
    return float(np.sum(a * np.log(a / b)))


def test_forward_kl_hand_computed():
    # KL(p || q) = 0.5 ln(0.5/0.8) + 2 * 0.25 ln(0.25/0.1) = 0.5 (ln 0.625 + ln 2.5)
    #            = 0.5 ln 1.5625 = ln 1.25 = 0.22314
    np.testing.assert_allclose(forward_kl(LOG_Q, LOG_P)[0, 0], np.log(1.25), rtol=1e-6)
    # Adding a constant to a row's logits changes nothing.
    np.testing.assert_allclose(forward_kl(LOG_Q + 7.0, LOG_P - 3.0), np.log(1.25), rtol=1e-5)


@pytest.mark.parametrize(
    "beta, expected",
    [
        # beta = 0: forward KL(p || q) = ln 1.25 = 0.22314.
        (0.0, np.log(1.25)),
        # beta = 1: reverse KL(q || p) = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.37600 - 0.18326 = 0.19274.
        (1.0, 0.8 * np.log(1.6) + 0.2 * np.log(0.4)),
        # beta = 0.5: m = (0.65, 0.175, 0.175);
        # 0.5 [0.5 ln(0.5/0.65) + 0.5 ln(0.25/0.175)] + 0.5 [0.8 ln(0.8/0.65) + 0.2 ln(0.1/0.175)]
        # = 0.5 (0.047155 + 0.054188) = 0.050672.
        (0.5, 0.050672),
        # beta = 0.3, straight from the definition.
        (0.3, 0.3 * _kl(P, 0.3 * P + 0.7 * Q) + 0.7 * _kl(Q, 0.3 * P + 0.7 * Q)),
    ],
)
def test_generalized_jsd_matches_formula(beta, expected):
    np.testing.assert_allclose(generalized_jsd(LOG_Q, LOG_P, beta)[0, 0], expected, rtol=1e-4)


def test_jsd_scaled_limits_approach_the_kls():
    eps = 1e-3
    fwd, rev = np.log(1.25), 0.8 * np.log(1.6) + 0.2 * np.log(0.4)
    np.testing.assert_allclose(generalized_jsd(LOG_Q, LOG_P, eps)[0, 0] / eps, fwd, rtol=5e-3)
    near_one = generalized_jsd(LOG_Q, LOG_P, 1 - eps)[0, 0] / eps
    np.testing.assert_allclose(near_one, rev, rtol=5e-3)


def test_temperature_softens_and_t2_scales():
    # At tau = 2 the distributions are sqrt(p), sqrt(q) renormalised:
    # p' = (0.41421, 0.29289, 0.29289), q' = (0.58579, 0.20711, 0.20711), with
    # p'/q' = (1/sqrt 2, sqrt 2, sqrt 2), so KL(p' || q') = (ln 2 / 2)(2 * 0.29289 - 0.41421)
    # = 0.34657 * 0.17157 = 0.059463; times tau^2 = 4: 0.23785.
    plain = forward_kl(LOG_Q, LOG_P, temperature=2.0, scale_by_t2=False)[0, 0]
    scaled = forward_kl(LOG_Q, LOG_P, temperature=2.0)[0, 0]
    np.testing.assert_allclose(plain, 0.059463, rtol=1e-4)
    np.testing.assert_allclose(scaled, 4 * 0.059463, rtol=1e-4)
    sp, sq = np.sqrt(P) / np.sqrt(P).sum(), np.sqrt(Q) / np.sqrt(Q).sum()
    np.testing.assert_allclose(plain, _kl(sp, sq), rtol=1e-5)


@pytest.mark.parametrize("kind", list(KDKind))
def test_zero_iff_equal_and_finite_at_extremes(kind):
    cfg = KDConfig(kind=kind, beta=0.5, temperature=1.5)
    k1, k2 = jax.random.split(jax.random.key(0))
    s = 3.0 * jax.random.normal(k1, (2, 5, 17))
    t = 3.0 * jax.random.normal(k2, (2, 5, 17))
    np.testing.assert_allclose(kd_per_token(s, s, cfg), 0.0, atol=1e-6)
    assert np.all(np.asarray(kd_per_token(s, t, cfg)) > 1e-4)
    # -inf and huge logits: no NaN in the value or the student gradient.
    t_ext = t.at[..., 0].set(-jnp.inf).at[..., 1].set(1e4)
    s_ext = s.at[..., 2].set(-1e4)
    value, grad = jax.value_and_grad(lambda x: kd_per_token(x, t_ext, cfg).sum())(s_ext)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_top_k_full_when_k_ge_vocab_and_renormalises_otherwise():
    k1, k2 = jax.random.split(jax.random.key(1))
    s, t = jax.random.normal(k1, (2, 4, 11)), jax.random.normal(k2, (2, 4, 11))
    full = generalized_jsd(s, t, 0.3, temperature=2.0)
    for k in (11, 50):
        np.testing.assert_allclose(generalized_jsd(s, t, 0.3, 2.0, teacher_top_k=k), full)
    # k = 2 on the hand example: support {0, 1}; p -> (2/3, 1/3), q -> (8/9, 1/9):
    # KL = 2/3 ln(3/4) + 1/3 ln 3 = -0.19179 + 0.36620 = 0.17441.
    want = 2 / 3 * np.log(0.75) + np.log(3) / 3
    np.testing.assert_allclose(forward_kl(LOG_Q, LOG_P, teacher_top_k=2)[0, 0], want, rtol=1e-5)


# ---- the objective on tiny models -------------------------------------------------------------
V = 64
STUDENT = ModelConfig.tiny(
    vocab_size=V, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, mlp_dim=128
)
TEACHER = STUDENT.replace(d_model=96, n_heads=3, mlp_dim=192)  # wider, same V


def _batch(seed=0, b=4, t=16, prompt=5, length=12):
    """Rows: `prompt` prompt tokens, then response up to `length`, then padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (b, t)).astype(np.int32)
    seg = np.zeros((b, t), np.int32)
    seg[:, :length] = 1
    seg[1, length - 3 :] = 0  # a shorter row
    loss_mask = seg > 0
    loss_mask[:, :prompt] = False
    return dict(tokens_BT=tokens, segment_ids_BT=seg, loss_mask_BT=loss_mask)


@pytest.fixture(scope="module")
def models():
    """(student, teacher), made once: eager initialisation costs seconds on the CPU."""
    return create_model(STUDENT, seed=1), create_model(TEACHER, seed=2)


class _Planted:
    """A student whose logits get `plant_BTV` added (to show which positions matter)."""

    def __init__(self, model, plant_BTV):
        self.model, self.plant = model, plant_BTV

    def forward(self, tokens_BT, segment_ids_BT):
        return self.model.forward(tokens_BT, segment_ids_BT) + self.plant


@pytest.mark.parametrize(
    "cfg",
    [
        KDConfig(temperature=2.0, ce_weight=0.5),
        KDConfig(kind=KDKind.JSD, beta=0.5, teacher_top_k=8, ce_weight=0.1),
    ],
)
def test_planted_logits_off_the_response_change_nothing(cfg, models):
    student, teacher = models
    batch = _batch()
    tg, tp = nnx.split(teacher)
    batch.update(jit_teacher(tg)(tp, batch["tokens_BT"], batch["segment_ids_BT"]))
    # Logit position t predicts token t + 1: it counts only when token t + 1 is a target.
    counts = np.pad(np.asarray(target_mask(batch))[:, 1:], ((0, 0), (0, 1)))
    assert counts.sum() == 3 * 7 + 4 and not counts[:, :4].any()  # prompt and padding are out
    rng = np.random.default_rng(3)
    plant = np.where(counts[..., None], 0.0, 1e4 * rng.choice([-1.0, 1.0], (4, 16, V)))
    plant = jnp.asarray(plant, jnp.float32)
    planted = dict(batch, teacher_logits_BTV=batch["teacher_logits_BTV"] + plant)
    objective = LogitDistillation(cfg)
    graphdef, params = nnx.split(student)

    def loss(params, b, plant_BTV):
        (total, den), _ = objective(_Planted(nnx.merge(graphdef, params), plant_BTV), b)
        return total, den

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (s0, d0), g0 = value_and_grad(params, batch, jnp.zeros_like(plant))
    (s1, d1), g1 = value_and_grad(params, planted, plant)
    assert float(d0) == float(d1) == 25.0 and np.isfinite(float(s0))
    np.testing.assert_allclose(s1, s0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_sparse_top_k_batch_equals_dense_top_k(models):
    student, teacher = models
    batch = _batch(seed=4)
    tg, tp = nnx.split(teacher)
    args = (tp, batch["tokens_BT"], batch["segment_ids_BT"])
    dense = dict(batch, **jit_teacher(tg)(*args))
    sparse = dict(batch, **jit_teacher(tg, top_k=6)(*args))
    assert sparse["teacher_ids_BTK"].shape == (4, 16, 6)
    cfg = KDConfig(kind=KDKind.JSD, beta=0.7, temperature=1.5, teacher_top_k=6)
    (sd, dd), md = LogitDistillation(cfg)(student, dense)
    (ss, ds), ms = LogitDistillation(cfg)(student, sparse)
    np.testing.assert_allclose(ss, sd, rtol=1e-5)
    assert float(dd) == float(ds)
    np.testing.assert_allclose(ms["ce"][0], md["ce"][0], rtol=1e-6)


def test_train_steps_move_student_toward_larger_teacher(models):
    student, teacher = models
    tg, tp = nnx.split(teacher)
    batch = _batch(seed=5, b=8)
    batch.update(jit_teacher(tg)(tp, batch["tokens_BT"], batch["segment_ids_BT"]))
    graphdef, params = nnx.split(student)
    tx = optax.adam(3e-3)
    step = jit_train_step(graphdef, LogitDistillation(KDConfig(temperature=2.0)), tx)
    state = TrainState.create(params, tx, seed=0)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["kd"]))
        assert bool(metrics["finite"])
    assert losses[-1] < 0.5 * losses[0], losses


def test_config_validation():
    assert KDConfig(kind="jsd").kind is KDKind.JSD
    for bad in (dict(beta=1.5), dict(temperature=0.0), dict(teacher_top_k=-1), dict(ce_weight=-1)):
        with pytest.raises(ValueError):
            KDConfig(**bad)
    with pytest.raises(ValueError):
        distill_loss(
            jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3)), KDConfig()
        )
