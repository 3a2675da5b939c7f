import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgrm.model import ModelConfig, create_model
from jaxgrm.rl.losses import PolicyLossConfig
from jaxgrm.train import (
    CrossEntropy,
    OptimConfig,
    PolicyGradient,
    TrainState,
    jit_train_step,
    make_optimizer,
)

WORKER = str(Path(__file__).with_name("train_worker.py"))


def _batch(seed=0, b=8, t=16, v=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, v, (b, t)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[:, 12:] = 0
    return dict(tokens_BT=tokens, segment_ids_BT=seg, loss_mask_BT=seg > 0)


def _setup(lr=1e-2):
    model = create_model(ModelConfig.tiny(vocab_size=64), seed=1)
    graphdef, params = nnx.split(model)
    tx = make_optimizer(OptimConfig(learning_rate=lr, warmup_steps=0, total_steps=10))
    return graphdef, tx, TrainState.create(params, tx, seed=0)


def test_gradient_accumulation_equals_one_batch():
    # Plain SGD, so parameter differences show gradient differences directly (Adam would
    # amplify last-ulp noise in near-zero gradients to a full learning-rate step).
    graphdef, _, s1 = _setup()
    _, _, s4 = _setup()
    tx = optax.sgd(0.5)
    s1, s4 = (TrainState.create(s.params, tx, seed=0) for s in (s1, s4))
    one = jit_train_step(graphdef, CrossEntropy(), tx, accum_steps=1)
    four = jit_train_step(graphdef, CrossEntropy(), tx, accum_steps=4)
    batch = _batch()
    for _ in range(2):
        s1, m1 = one(s1, batch)
        s4, m4 = four(s4, batch)
        np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
        np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(s1.step) == 2 and int(s1.skipped) == 0


def test_non_finite_update_is_skipped_and_counted():
    graphdef, tx, state = _setup()
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    batch = _batch()
    b, t = batch["tokens_BT"].shape
    old = np.zeros((b, t), np.float32)
    old[0, 3] = np.nan  # one poisoned old log-prob on a loss token
    rl_batch = dict(batch, old_logp_BT=old, adv_BT=np.ones((b, t), np.float32))
    step = jit_train_step(graphdef, PolicyGradient(PolicyLossConfig()), tx)
    state, metrics = step(state, rl_batch)
    assert not bool(metrics["finite"]) and int(state.skipped) == 1 and int(state.step) == 1
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    for a, b_ in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b_)
    # A clean batch afterwards trains normally.
    rl_batch["old_logp_BT"] = np.zeros((b, t), np.float32)
    state, metrics = step(state, rl_batch)
    assert bool(metrics["finite"]) and int(state.skipped) == 1


def _run_worker(args, devices=1, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, WORKER, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    losses = [float(x) for x in re.findall(r"^loss \d+ (\S+)$", out, re.M)]
    params = float(re.search(r"^params (\S+)$", out, re.M).group(1))
    spec = re.search(r"^sharding (.*)$", out, re.M).group(1)
    return losses, params, spec


@pytest.fixture(scope="module")
def single_device():
    return _result(_run_worker([1, 1, 1]))


def test_eight_devices_fsdp_tensor_match_one_device(single_device):
    losses, params, spec = _result(_run_worker([2, 2, 2], devices=8))
    assert spec == "P('tensor', 'fsdp')"  # the embedding really is split over the mesh
    np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
    np.testing.assert_allclose(params, single_device[1], rtol=1e-5)


def test_two_processes_match_one_process(single_device):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    coord = f"127.0.0.1:{port}"
    procs = [_run_worker([2, 1, 1, coord, 2, i]) for i in range(2)]
    results = [_result(p) for p in procs]
    for losses, params, _ in results:
        np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
        np.testing.assert_allclose(params, single_device[1], rtol=1e-5)


def test_cross_entropy_ignores_padding_and_segment_starts():
    model = create_model(ModelConfig.tiny(vocab_size=64), seed=1)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    (total, den), _ = CrossEntropy()(model, batch)
    # 12 real tokens per row, the first has no predecessor: 11 targets x 8 rows.
    assert float(den) == 88
    poisoned = dict(batch, tokens_BT=batch["tokens_BT"].at[:, 12:].set(5))
    (total2, _), _ = CrossEntropy()(model, poisoned)
    np.testing.assert_allclose(total, total2, rtol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [8, 40, 1024])
@pytest.mark.parametrize("remat_bytes", [0, 1 << 30])
def test_chunked_logprobs_match_full_logits(chunk_tokens, remat_bytes):
    """Every chunking, with and without rematerialisation, gives the log-probs and gradients
    of the full [B, T, V] log-softmax."""
    from jaxgrm.sampling import gather_logprobs
    from jaxgrm.train.objectives import token_logprobs

    model = create_model(ModelConfig.tiny(vocab_size=64), seed=3)
    graphdef, params = nnx.split(model)
    batch = _batch(seed=5, b=6, t=15)
    tokens, seg = jnp.asarray(batch["tokens_BT"]), jnp.asarray(batch["segment_ids_BT"])
    weights = jnp.asarray(np.random.default_rng(0).standard_normal((6, 15)), jnp.float32)

    def reference(p):
        m = nnx.merge(graphdef, p)
        logp = gather_logprobs(m.forward(tokens, seg)[:, :-1], tokens[:, 1:])
        return jnp.pad(logp, ((0, 0), (1, 0)))

    def chunked(p):
        m = nnx.merge(graphdef, p)
        return token_logprobs(m, tokens, seg, chunk_tokens=chunk_tokens, remat_bytes=remat_bytes)

    np.testing.assert_allclose(chunked(params), reference(params), rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(lambda p: (reference(p) * weights).sum())(params)
    g = jax.grad(lambda p: (chunked(p) * weights).sum())(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
