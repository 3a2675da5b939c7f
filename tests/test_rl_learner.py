"""The RL loop end to end on a tiny world: exact resume after SIGKILL, save on SIGTERM."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments/configs/world_rl_smoke.py")


def _start(workdir: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxgrm.cli", "rl", "--config", CONFIG, "--workdir", str(workdir)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "rl-both" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for_step(proc, workdir: Path, step: int, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m["step"] >= step for m in _metrics(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run")


def _finish(proc, timeout: float = 300) -> int:
    out, _ = proc.communicate(timeout=timeout)
    proc.output = out
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run; its SFT warm-up and tokenizer are reused by the other runs."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = _start(workdir)
    assert _finish(proc) == 0, proc.output
    return workdir


def _copy_warm_start(reference: Path, workdir: Path):
    shutil.copytree(reference / "sft", workdir / "sft")
    shutil.copy(reference / "tokenizer.model", workdir / "tokenizer.model")


def _curve(workdir: Path) -> dict[int, tuple]:
    return {m["step"]: (m.get("loss"), m.get("reward_mean")) for m in _metrics(workdir)}


def test_rollouts_train_and_evaluate(reference):
    metrics = _metrics(reference)
    steps = [m["step"] for m in metrics]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    assert "val/accuracy" in metrics[0] and "val/accuracy" in metrics[3]
    train = [m for m in metrics if m["step"] > 0]
    # The label-only warm-up makes rewards vary, so the policy loss is not trivially zero.
    assert any(m["reward_std"] > 0 for m in train)
    assert any(abs(m["loss"]) > 0 for m in train)
    # Prompts of varying length fall in the buckets: prefill + decode compiled once each.
    assert {m["sampler_compiles"] for m in train} == {2.0}
    assert (reference / "rl-both" / "samples.log").exists()
    # Each stage leaves a bundle that `jaxgrm score --ckpt` can load.
    from jaxgrm.bundle import load_bundle

    bundle = load_bundle(reference / "rl-both" / "bundle")
    assert bundle.provenance["stage"] == "rl-both" and bundle.scale == "xhs5"
    assert (reference / "sft" / "bundle" / "jaxgrm.json").exists()
    assert any((reference / "rl-both" / "tb").iterdir())


def test_sigkill_then_resume_repeats_the_uninterrupted_run(reference, tmp_path):
    _copy_warm_start(reference, tmp_path)
    proc = _start(tmp_path)
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_metrics(tmp_path)) < 7  # it really was cut short
    proc = _start(tmp_path)
    assert _finish(proc) == 0, proc.output
    assert _curve(tmp_path) == _curve(reference)


def test_sigterm_saves_before_exiting(reference, tmp_path):
    _copy_warm_start(reference, tmp_path)
    proc = _start(tmp_path)
    _wait_for_step(proc, tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc) == 128 + signal.SIGTERM, proc.output
    done = max(m["step"] for m in _metrics(tmp_path))
    saved = sorted(int(p.name) for p in (tmp_path / "rl-both" / "checkpoints").iterdir())
    assert saved[-1] == done  # the step finished when the signal came is on disk


def test_reference_policy_kl_is_logged_and_zero_at_the_start(tmp_path):
    import dataclasses

    from jaxgrm.data.world import WorldConfig, generate
    from jaxgrm.model import ModelConfig, create_model
    from jaxgrm.prompts import PromptConfig, TraceFormat, render_prompt_text
    from jaxgrm.rl.learner import Learner, RLConfig
    from jaxgrm.rl.losses import PolicyLossConfig
    from jaxgrm.tokenizer import SentencePieceTokenizer

    world = generate(WorldConfig(train_size=60, validation_size=8, random_size=8, longtail_size=8))
    prompt = PromptConfig(
        format=TraceFormat.LABEL_ONLY, criteria=False, instructions=False, doc_budget=32
    )
    texts = [render_prompt_text(ex, ex.doc, prompt) for ex in world["train"]]
    tok = SentencePieceTokenizer.train(texts, vocab_size=400)
    model = create_model(
        ModelConfig.tiny(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=2,
                         n_kv_heads=1, head_dim=32, mlp_dim=128, max_seq_len=512)
    )  # fmt: skip
    cfg = RLConfig(
        steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4, prompt=prompt,
        prompt_buckets=(128, 256), eval_every=0, save_every=0, sample_every=0,
        loss=PolicyLossConfig(kl_coef=0.1),
    )  # fmt: skip
    learner = Learner(model, tok, world["train"], world["validation"], cfg, tmp_path)
    first = learner.rl_step(0)
    assert first["kl"] == 0.0  # the policy is the reference before any update
    second = learner.rl_step(1)
    assert second["kl"] >= 0.0 and dataclasses.is_dataclass(learner.state)


def test_world_pipeline_runs_sharded_on_two_devices(tmp_path):
    """`jaxgrm rl` puts SFT and RL on a mesh over every device when there are several."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    cmd = [sys.executable, "-m", "jaxgrm.cli", "rl", "--config", CONFIG, "--workdir", str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    cfg = json.loads((tmp_path / "rl-both" / "config.json").read_text())
    assert cfg["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    steps = [m["step"] for m in _metrics(tmp_path)]
    assert steps[-1] == cfg["steps"]
    assert all(np.isfinite(m["loss"]) for m in _metrics(tmp_path) if "loss" in m)
