"""Tests for jaxgrm.bundle and jaxgrm.score: bundle round trip, grade distributions checked
against an independent teacher-forced forward, resume, bad rows, the CLI, a trained model."""

import functools
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from click.testing import CliRunner
from flax import nnx

from jaxgrm.bundle import BUNDLE_FILE, BundleError, load_bundle, save_bundle
from jaxgrm.cli import main
from jaxgrm.data.schema import SCALES, RelevanceExample
from jaxgrm.model import ModelConfig, create_model
from jaxgrm.prompts import (
    PromptConfig,
    TraceFormat,
    format_answer,
    render_prompt,
    render_prompt_text,
)
from jaxgrm.sampling import gather_logprobs
from jaxgrm.score import BadRowError, GradeScorer, score_file
from jaxgrm.tokenizer import HFTokenizer, SentencePieceTokenizer

PROMPT = PromptConfig(instructions=False, criteria=False, doc_budget=24)
WORDS = [
    "cheap", "hiking", "boots", "trail", "shoes", "waterproof",
    "leather", "tent", "camping", "stove", "recipe", "noodle",
]  # fmt: skip
TARGET = "<step1> ok </step1><answer> 2 </answer>"  # what the trained model learns to answer


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {
            "query": " ".join(rng.sample(WORDS, 3)),
            "doc": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))),
            "scale": rng.choice(["xhs5", "homedepot3", "trec4"]),
        }
        if i % 2:
            row["id"] = f"p{i}"
        rows.append(row)
    return rows


def example(row: dict) -> RelevanceExample:
    scale = row.get("scale", "xhs5")
    return RelevanceExample(
        qid="q", query=row["query"], doc=row["doc"], label=SCALES[scale].grades[0],
        scale=scale, source="t",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    texts = [render_prompt_text(example(r), r["doc"], PROMPT) for r in make_rows(200, seed=1)]
    texts += [TARGET] + [format_answer(g) for g in range(-1, 5)]
    return SentencePieceTokenizer.train(texts, vocab_size=400)


def tiny_model(tok, seed=0):
    cfg = ModelConfig.tiny(
        vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
        head_dim=32, mlp_dim=128, max_seq_len=256,
    )  # fmt: skip
    return create_model(cfg, seed=seed)


@pytest.fixture(scope="module")
def bundle_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("fixture") / "model"  # bundles named alike share compiles
    save_bundle(tiny_model(tok), tok, PROMPT, path, scale="xhs5", provenance={"stage": "sft"})
    return path


@pytest.fixture(scope="module")
def scorer(bundle_dir):
    return GradeScorer(load_bundle(bundle_dir), batch_size=4, max_new_tokens=12)


def forward(model, seqs, rows=8, width=256):
    """Logits [len(seqs), width, V] of right-padded rows with one jitted compile per model
    config (right padding leaves the logits of real positions unchanged: causality)."""
    graphdef, state = nnx.split(model)
    tokens = np.zeros((rows, width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return np.asarray(_forward(graphdef, state, jnp.asarray(tokens)))[: len(seqs)]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state).forward(tokens)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bundle_round_trip(tok, tmp_path):
    model = tiny_model(tok, seed=3)
    save_bundle(model, tok, PROMPT, tmp_path, provenance={"stage": "rl", "step": 7, "run": "x"})
    meta = json.loads((tmp_path / BUNDLE_FILE).read_text())
    assert meta["tokenizer"] == "tokenizer.model" and meta["prompt"]["doc_budget"] == 24
    b = load_bundle(tmp_path)
    assert b.prompt_config == PROMPT and b.scale is None
    assert b.provenance["stage"] == "rl" and b.provenance["step"] == 7 and b.provenance["run"]
    assert b.provenance["created"].endswith("+00:00")
    text = "cheap hiking boots <answer> 2 </answer>"
    assert b.tokenizer.encode(text) == tok.encode(text)
    ids = [tok.encode(text)]
    np.testing.assert_array_equal(forward(b.model, ids), forward(model, ids))


def test_bundle_with_an_hf_tokenizer_replaces_a_stale_one(tok, tmp_path):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    raw.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    hf = HFTokenizer(raw, {"eos_token": "<|eos|>"})
    save_bundle(tiny_model(tok), tok, PROMPT, tmp_path)
    save_bundle(tiny_model(hf), hf, PROMPT, tmp_path, scale="trec4")
    assert not (tmp_path / "tokenizer.model").exists()
    b = load_bundle(tmp_path)
    assert isinstance(b.tokenizer, HFTokenizer) and b.scale == "trec4"
    assert b.tokenizer.encode(TARGET) == hf.encode(TARGET)
    scorer = GradeScorer(b, batch_size=2, max_new_tokens=8)
    assert scorer.candidates[-1] == hf.encode(" -1 </answer>")


def test_bundle_errors(tok, tmp_path, bundle_dir):
    with pytest.raises(BundleError, match="jaxgrm.json: missing"):
        load_bundle(tmp_path)
    save_bundle(tiny_model(tok), tok, PROMPT, tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(BundleError, match="tokenizer.model: missing"):
        load_bundle(tmp_path)
    meta = json.loads((bundle_dir / BUNDLE_FILE).read_text())
    for field, value, match in (
        ("prompt", {**meta["prompt"], "format": "essay"}, "'prompt.format'"),
        ("scale", "xhs7", "'scale'"),
        ("provenance", {"step": "ten"}, "'provenance.step'"),
    ):
        (tmp_path / BUNDLE_FILE).write_text(json.dumps({**meta, field: value}))
        with pytest.raises(BundleError, match=match):
            load_bundle(tmp_path)
    with pytest.raises(ValueError, match="scale"):
        save_bundle(tiny_model(tok), tok, PROMPT, tmp_path, scale="nope")


def test_scores_match_an_independent_forward(scorer, tmp_path):
    rows = make_rows(6)
    out = tmp_path / "scores.jsonl"
    summary = score_file(scorer, write_jsonl(tmp_path / "in.jsonl", rows), out, trace=True)
    assert (summary.rows, summary.scored, sum(summary.bad.values())) == (6, 6, 0)
    scored = read_jsonl(out)
    assert [r["id"] for r in scored] == [r.get("id", i + 1) for i, r in enumerate(rows)]
    for s, r in zip(scored, rows, strict=True):
        grades = SCALES[r["scale"]].grades
        assert list(s["distribution"]) == [str(g) for g in grades]
        assert sum(s["distribution"].values()) == pytest.approx(1.0, abs=1e-5)
        mean = sum(int(g) * p for g, p in s["distribution"].items())
        assert s["expected_grade"] == pytest.approx(mean, abs=1e-5)
        assert s["valid"] == (s["grade"] is not None) and isinstance(s["trace"], str)
    assert scorer.num_compiles <= 2  # one context bucket (or two): not one compile per batch

    # Independently: the trace is greedy under a full forward, and p(g) is the softmax of the
    # teacher-forced log-likelihood of prompt + trace-up-to-<answer> + <answer> + " g </answer>".
    model, tok = scorer.bundle.model, scorer.bundle.tokenizer
    answer, close = tok.token_id("<answer>"), tok.token_id("</answer>")
    ex = example(rows[0])
    prompt = scorer.prompt_ids(ex)
    (result,) = scorer([prompt], [ex.scale])
    trace = result.trace_ids
    cands = [tok.encode(f" {g} </answer>") for g in SCALES[ex.scale].grades]
    if answer in trace:
        context = prompt + trace[: trace.index(answer) + 1]
    else:
        context = prompt + [t for t in trace if t not in (tok.eos_id, close)] + [answer]
    seqs = [prompt + trace] + [context + c for c in cands]
    logits = forward(model, seqs)
    greedy = logits[0, len(prompt) - 1 : len(prompt) + len(trace) - 1].argmax(-1)
    assert trace == greedy.tolist()
    assert len(trace) == 12 or trace[-1] in (tok.eos_id, close)
    loglik = []
    for i, seq in enumerate(seqs[1:], start=1):
        logp = jax.nn.log_softmax(logits[i, len(context) - 1 : len(seq) - 1])
        loglik.append(
            float(np.take_along_axis(logp, np.asarray(seq[len(context) :])[:, None], 1).sum())
        )
    expected = np.exp(np.asarray(loglik) - max(loglik))
    expected /= expected.sum()
    got = np.asarray(list(result.distribution.values()))
    np.testing.assert_allclose(got, expected, atol=2e-5)
    np.testing.assert_allclose(list(scored[0]["distribution"].values()), expected, atol=2e-5)


def test_resume_after_interrupt_equals_one_run(scorer, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", make_rows(10, seed=2))
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    score_file(scorer, src, full, progress=False)

    class Interrupt(Exception):
        pass

    calls = {"n": 0}
    real_call = GradeScorer.__call__

    def flaky(self, prompts, scales):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt
        return real_call(self, prompts, scales)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GradeScorer, "__call__", flaky)
        with pytest.raises(Interrupt):
            score_file(scorer, src, part, progress=False)
    assert len(read_jsonl(part)) == 4  # the first batch was written
    with part.open("a") as f:  # and the next write was cut short
        f.write(full.read_text().splitlines()[4][:25])
    logs = []
    summary = score_file(scorer, src, part, progress=False, log=logs.append)
    assert summary.already_done == 4 and summary.scored == 6
    assert any("partial last line" in m for m in logs)
    a, b = read_jsonl(full), read_jsonl(part)
    assert [r["id"] for r in a] == [r["id"] for r in b] and len({r["id"] for r in b}) == 10
    for x, y in zip(a, b, strict=True):
        assert (x["grade"], x["valid"], x["line"]) == (y["grade"], y["valid"], y["line"])
        for g, p in x["distribution"].items():
            assert y["distribution"][g] == pytest.approx(p, abs=1e-5)
    again = score_file(scorer, src, part, progress=False)  # nothing left to do
    assert (again.scored, again.already_done) == (0, 10) and read_jsonl(part) == b


def test_bad_rows_are_reported_counted_and_skipped(scorer, tmp_path):
    good = make_rows(3, seed=4)
    lines = [json.dumps(good[0]), '{"query": "boots", "doc": ', json.dumps({"query": "boots"})]
    lines += [json.dumps({"query": " ", "doc": "x"}), json.dumps({**good[1], "scale": "xhs9"})]
    lines += [json.dumps(good[1]), json.dumps({**good[2], "id": "p1"}), ""]
    lines += [json.dumps({"query": "boots", "document": "x"}), json.dumps(good[2])]
    src = tmp_path / "in.jsonl"
    src.write_bytes("\n".join(lines).encode() + b'\n{"query": "\xff", "doc": "x"}\n')
    out, logs = tmp_path / "out.jsonl", []
    with pytest.raises(BadRowError, match=r"in.jsonl:2: malformed_row"):
        score_file(scorer, src, out, progress=False, log=logs.append)
    assert not out.exists() or out.read_text() == ""
    logs.clear()
    summary = score_file(scorer, src, out, on_bad_row="skip", progress=False, log=logs.append)
    expected = {
        "malformed_row": [2], "missing_field": [3], "empty_query": [4], "unknown_scale": [5],
        "duplicate_id": [7], "bad_value": [9], "invalid_utf8": [11],
    }  # fmt: skip
    assert summary.bad == {k: len(v) for k, v in expected.items()}
    for reason, where in expected.items():
        assert any(m.startswith(f"{src}:{where[0]}: {reason}") for m in logs), reason
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert sorted((e["line"], e["reason"]) for e in errors) == sorted(
        (v[0], k) for k, v in expected.items()
    )
    assert [r["line"] for r in read_jsonl(out)] == [1, 6, 10]
    assert summary.rows == summary.scored + sum(summary.bad.values()) == 10


def test_too_long_prompt_is_a_bad_row(scorer, tmp_path):
    rows = [make_rows(1)[0], {"query": " ".join(WORDS * 40), "doc": "boots"}]
    logs = []
    summary = score_file(
        scorer, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl",
        on_bad_row="skip", progress=False, log=logs.append,
    )  # fmt: skip
    assert summary.bad == {"too_long": 1} and summary.scored == 1
    assert logs[0].startswith(f"{tmp_path / 'in.jsonl'}:2: too_long")


def test_cli_score(bundle_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", make_rows(3) + [{"query": "x", "doc": ""}])
    out = tmp_path / "out.jsonl"
    args = ["score", "--ckpt", str(bundle_dir), "--input", str(src), "--output", str(out)]
    args += ["--batch-size", "4", "--max-new-tokens", "12"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "in.jsonl:4: empty_doc" in result.output
    result = CliRunner().invoke(main, [*args, "--on-bad-row", "skip", "--trace"])
    assert result.exit_code == 0, result.output
    assert "scored 3" in result.output and "empty_doc: 1" in result.output
    assert [r["line"] for r in read_jsonl(out)] == [1, 2, 3] and "trace" in read_jsonl(out)[0]


def train_fixed_answer(model, tok, steps=100):
    """Teach `model` to answer TARGET after any prompt (cross-entropy on the response)."""
    seqs, masks = [], []
    for row in make_rows(8, seed=5):
        prompt = render_prompt(example(row), tok, PROMPT).ids
        target = tok.encode(TARGET) + [tok.eos_id]
        seqs.append(prompt + target)
        masks.append([0] * len(prompt) + [1] * len(target))
    width = max(map(len, seqs))
    tokens = np.array([s + [0] * (width - len(s)) for s in seqs], np.int32)
    loss_mask = np.array([m + [0] * (width - len(m)) for m in masks], np.float32)
    valid = (np.arange(width)[None] < np.array([len(s) for s in seqs])[:, None]).astype(np.int32)
    graphdef, params = nnx.split(model)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits = nnx.merge(graphdef, p).forward(tokens[:, :-1], valid[:, :-1])
            lp = gather_logprobs(logits, tokens[:, 1:])
            return -(lp * loss_mask[:, 1:]).sum() / loss_mask.sum()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = opt.init(params)
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state)
    nnx.update(model, params)
    return float(value)


def test_a_model_that_always_answers_2(tok, tmp_path):
    model = tiny_model(tok, seed=1)
    assert train_fixed_answer(model, tok) < 0.02
    rows = [{**r, "scale": "xhs5"} for r in make_rows(3, seed=6)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    for fmt in TraceFormat:
        path = tmp_path / fmt.value / "model"
        save_bundle(model, tok, PromptConfig(**{**PROMPT.__dict__, "format": fmt}), path)
        scorer = GradeScorer(load_bundle(path), batch_size=4, max_new_tokens=12)
        out = tmp_path / f"{fmt.value}.jsonl"
        score_file(scorer, src, out, trace=True, progress=False)
        for r in read_jsonl(out):
            dist = r["distribution"]
            assert max(dist, key=dist.get) == "2" and dist["2"] > 0.9, r
            if fmt is TraceFormat.REASONING:
                assert r["grade"] == 2 and r["valid"] and r["trace"] == TARGET
            else:  # the model reasons first: no label-only answer, but the same distribution
                assert r["grade"] is None and not r["valid"]
