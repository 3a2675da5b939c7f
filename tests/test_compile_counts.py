"""Compilations stay bounded over an RL run whose prompt lengths vary from step to step.

A tiny learner runs 20 steps with 2 prompts x G = 2 rollouts each; the stop tokens are made
likely, so completions end early at varying lengths. The longest prompt of a step (which sets its
padded length) varies across steps; the two prompt buckets are taken from the data so that the
first 10 steps already use both. The trace counts (`traces/*`, one per new input shape) are then:

* rollout sampler: prefill + decode per (prompt bucket, row bucket) used. Rows are always
  2 x 2 = 4, one power-of-two row bucket: 2 x 2 buckets x 1 = 4.
* train step: one per batch shape [rows, bucket + max_new_tokens], i.e. per bucket: 2.
* greedy evaluation (its own sampler): the 8 validation prompts are one chunk of 8 rows in the
  low bucket: 2.

XLA compilations (`compiles/*`, from jax.monitoring) equal the traces. They would not if the
learner passed its initial weights uncommitted (as created): later steps pass the train step's
outputs, which are committed to the device, and jax builds a second executable for the same
trace (4 + 2 sampler, 2 + 1 train step, 2 + 2 evaluation, as measured before the learner
committed its state).

Steps 11..20 compile nothing at all, not even an eager op (`compiles/xla` does not move). Without
buckets every prompt length is its own shape and compiles again, which the last test shows.
"""

import json

import jax
import numpy as np
import pytest

STEPS, WARM = 20, 10
MAX_NEW = 6


@pytest.fixture(scope="module")
def world_parts():
    from jaxgrm.data.world import WorldConfig, generate
    from jaxgrm.prompts import PromptConfig, TraceFormat, render_prompt_text
    from jaxgrm.tokenizer import SentencePieceTokenizer

    world = generate(WorldConfig(train_size=60, validation_size=8, random_size=8, longtail_size=8))
    prompt = PromptConfig(
        format=TraceFormat.LABEL_ONLY, criteria=False, instructions=False, doc_budget=32
    )
    texts = [render_prompt_text(ex, ex.doc, prompt) for ex in world["train"]]
    tok = SentencePieceTokenizer.train(texts, vocab_size=400)
    return world, prompt, tok


def _model(tok):
    from jaxgrm.model import ModelConfig, create_model

    model = create_model(
        ModelConfig.tiny(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2,
                         n_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=512,
                         tie_embeddings=False)
    )  # fmt: skip
    # Make the stop tokens likely, so completions end early and vary in length.
    stop = [tok.eos_id, tok.token_id("</answer>")]
    model.lm_head_DV[...] = model.lm_head_DV[...].at[:, stop].multiply(4.0)
    return model


def _learner(world_parts, workdir, buckets, **kw):
    from jaxgrm.rl.learner import Learner, RLConfig

    world, prompt, tok = world_parts
    cfg = RLConfig(
        steps=STEPS, prompts_per_step=2, group_size=2, max_new_tokens=MAX_NEW, prompt=prompt,
        prompt_buckets=buckets, eval_every=WARM, eval_examples=8, save_every=0, sample_every=0,
        **kw,
    )  # fmt: skip
    return Learner(_model(tok), tok, world["train"], world["validation"], cfg, workdir)


def _longest_prompts(world_parts, tmp_path) -> list[int]:
    """The longest prompt of each step, from the learner's own (seed, step) -> prompts rule."""
    probe = _learner(world_parts, tmp_path / "probe", (256,))
    return [max(len(p) for p in probe.prompts_for_step(s)[1]) for s in range(STEPS)]


@pytest.fixture(scope="module")
def run(world_parts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compiles")
    longest = _longest_prompts(world_parts, tmp)
    warm = sorted(set(longest[:WARM]))
    # The low bucket splits the warm-up steps' lengths; the high one holds every step's.
    buckets = (warm[len(warm) // 2 - 1], max(longest))
    learner = _learner(world_parts, tmp / "run", buckets)
    learner.run()
    with open(tmp / "run" / "metrics.jsonl") as f:
        records = {r["step"]: r for r in map(json.loads, f)}
    return learner, records, longest, buckets


def test_prompt_lengths_vary_and_fill_both_buckets_during_warm_up(run):
    learner, records, longest, (low, high) = run
    assert len(set(longest)) >= 4  # unbucketed, these would be as many shapes
    assert any(n <= low for n in longest[:WARM]) and any(n > low for n in longest[:WARM])
    assert max(len(p) for p in learner.val_prompts) <= low
    lengths = [records[s]["completion_len"] for s in range(1, STEPS + 1)]
    assert min(lengths) < MAX_NEW and len(set(lengths)) > 1  # early stops, varying lengths


def test_compile_counts_are_exact_and_logged_every_step(run):
    _, records, _, _ = run
    assert sorted(records) == list(range(STEPS + 1))
    final = records[STEPS]
    # Traces: 2 prompt buckets x 1 row bucket x (prefill + decode); one batch shape per bucket.
    assert final["traces/sampler"] == 2 * 2 * 1
    assert final["traces/train_step"] == 2
    assert final["traces/eval"] == 2
    # Compiles: exactly one per trace, since the learner commits its initial state to the device
    # (see the module docstring for what an uncommitted one costs).
    assert final["compiles/train_step"] == final["traces/train_step"]
    assert final["compiles/sampler"] == 4
    assert final["compiles/eval"] == 2
    assert "compiles/ref_logp" not in final  # no reference policy without a KL term
    assert final["compiles/xla"] >= final["compiles/sampler"] + final["compiles/train_step"]
    # Logged at every step, cumulative, and step 1 compiles the sampler and the train step.
    for step, r in records.items():
        assert r["compiles/eval"] >= 2 and r["traces/eval"] == 2  # the step-0 evaluation
        if step > 0:
            assert r["sampler_compiles"] == r["traces/sampler"]
    assert records[1]["compiles/sampler"] == 2 and records[1]["compiles/train_step"] == 1
    for key in ("compiles/sampler", "compiles/train_step", "compiles/xla"):
        series = [records[s][key] for s in range(1, STEPS + 1)]
        assert series == sorted(series), key


def test_no_compilation_after_warm_up(run):
    _, records, _, _ = run
    warm = records[WARM]  # after step 10 and the evaluation that follows it
    for key in warm:
        if key.startswith(("compiles/", "traces/")):
            assert all(records[s][key] == warm[key] for s in range(WARM, STEPS + 1)), key


def test_without_buckets_every_prompt_length_compiles(world_parts, tmp_path, run):
    """The counters do see recompiles: with one bucket per token (prompt_buckets=(1,)) nothing is
    padded, so two steps whose longest prompts differ but share a bucket above compile twice."""
    _, _, longest, (low, _) = run
    lengths = sorted({n for n in longest if n <= low})[:2]
    assert len(lengths) == 2
    learner = _learner(world_parts, tmp_path, (1,))
    for n in lengths:
        out = learner.rl_step(longest.index(n))
    for kind in ("traces", "compiles"):  # no weights reused across shapes: compiles == traces
        assert out[f"{kind}/sampler"] == 2 * 2, kind  # 2 with the buckets
        assert out[f"{kind}/train_step"] == 2, kind  # 1 with the buckets
    assert out["compiles/eval"] == 0 and out["compiles/xla"] > 0
    assert jax.device_get(learner.state.step) == 2 and np.isfinite(out["loss"])
