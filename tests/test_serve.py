"""Tests for jaxgrm.serve: the real server on 127.0.0.1 (an OS-chosen port), driven over
loopback with urllib: a good request, each 4xx case with its reason, the page, healthz."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from jaxgrm.bundle import load_bundle, save_bundle
from jaxgrm.data.schema import SCALES, RelevanceExample
from jaxgrm.model import ModelConfig, create_model
from jaxgrm.prompts import PromptConfig, format_answer, format_trace, render_prompt_text
from jaxgrm.score import GradeScorer
from jaxgrm.serve import ServeConfig, make_server, trace_steps
from jaxgrm.tokenizer import SentencePieceTokenizer

PROMPT = PromptConfig(instructions=False, criteria=False, doc_budget=24)
WORDS = [
    "cheap", "hiking", "boots", "trail", "shoes", "waterproof",
    "leather", "tent", "camping", "stove", "recipe",
]  # fmt: skip
LIMITS = ServeConfig(max_pairs=3, max_field_chars=200, max_body_bytes=4000)
TRACE = format_trace(
    {"step1": {"subject": "boots", "intent": "buy"}, "step2": {"subject": "tent"}}, 0
)


@pytest.fixture(scope="module")
def tok():
    texts = [
        render_prompt_text(
            RelevanceExample(
                qid="q",
                query=" ".join(WORDS[i : i + 3]),
                doc=" ".join(WORDS),
                label=0,
                scale="xhs5",
                source="t",
            ),  # fmt: skip
            " ".join(WORDS[i:]),
            PROMPT,
        )
        for i in range(8)
    ]
    texts += [TRACE] * 4 + [format_answer(g) for g in range(-1, 5)]
    return SentencePieceTokenizer.train(texts, vocab_size=400)


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):
    cfg = ModelConfig.tiny(
        vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
        head_dim=16, mlp_dim=64, max_seq_len=256,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("serve") / "model"
    save_bundle(create_model(cfg, seed=0), tok, PROMPT, path, scale="xhs5",
                provenance={"stage": "sft", "step": 3})  # fmt: skip
    scorer = GradeScorer(load_bundle(path), batch_size=2, max_new_tokens=8)
    srv = make_server(scorer, "127.0.0.1", 0, LIMITS)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.port}"
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def call(url, body=None, content_type="application/json", method=None):
    """(status, decoded JSON or text) of one request; `body`: bytes, or an object as JSON."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None and content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            status, raw, ctype = res.status, res.read(), res.headers.get_content_type()
    except urllib.error.HTTPError as err:
        status, raw, ctype = err.code, err.read(), err.headers.get_content_type()
    text = raw.decode("utf-8")
    return status, json.loads(text) if ctype == "application/json" else text


def test_score_pairs(server):
    pairs = [
        {"query": "cheap hiking boots", "doc": "waterproof leather boots", "id": "a"},
        {"query": "camping stove", "doc": "noodle recipe", "doc_title": "t", "scale": "trec4"},
        {"query": "tent", "doc": "trail shoes", "scale": "homedepot3"},
    ]
    status, body = call(server + "/score", {"pairs": pairs, "trace": True})
    assert status == 200, body
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert [r["id"] for r in results] == ["a", 1, 2]  # default id: the pair's index
    for r, p in zip(results, pairs, strict=True):
        scale = SCALES[p.get("scale", "xhs5")]
        assert r["scale"] == scale.name
        assert list(r["distribution"]) == [str(g) for g in scale.grades]
        assert sum(r["distribution"].values()) == pytest.approx(1, abs=1e-5)
        assert scale.grades[0] <= r["expected_grade"] <= scale.grades[-1]
        assert r["valid"] == (r["grade"] is not None) and isinstance(r["trace"], str)
        assert [s["step"] for s in r["steps"]] == ["step1", "step2", "step3"]
        assert all(s["status"] in ("ok", "missing", "malformed") for s in r["steps"])
    status, body = call(server + "/score", {"pairs": pairs[:1]})
    assert status == 200 and "trace" not in body["results"][0]
    assert "steps" not in body["results"][0]


def test_trace_steps(tok):
    steps = trace_steps(tok.encode(TRACE), tok, "xhs5")
    assert steps[0] == {
        "step": "step1", "status": "ok", "text": "=> subject: boots; intent: buy",
        "conclusion": {"subject": "boots", "intent": "buy"},
    }  # fmt: skip
    assert steps[1]["conclusion"] == {"subject": "tent"}
    assert steps[2]["status"] == "ok" and steps[2]["conclusion"] is None  # `=>` and nothing
    broken = trace_steps(tok.encode("<step1> x <answer> 1 </answer>"), tok, "xhs5")
    assert [s["status"] for s in broken] == ["malformed", "missing", "missing"]
    assert broken[0]["text"] is None and broken[0]["conclusion"] is None


GOOD = {"query": "tent", "doc": "camping tent"}


@pytest.mark.parametrize(
    "body, reason, message",
    [
        (b"{not json", None, "not JSON"),
        (b'{"pairs": [{"query": "\xff", "doc": "d"}]}', None, "not UTF-8"),
        ([GOOD], None, "expected a JSON object"),
        ({"pairs": []}, None, "non-empty list"),
        ({"pairs": [GOOD], "extra": 1}, None, "unknown field"),
        ({"pairs": [GOOD], "trace": "yes"}, None, "'trace'"),
        ({"pairs": [GOOD] * 4}, None, "4 pairs; at most 3"),
        ({"pairs": [{"doc": "d"}]}, "missing_field", "'query' is missing"),
        ({"pairs": [{"query": "q", "doc": " "}]}, "empty_doc", "'doc' is empty"),
        ({"pairs": [{"query": 3, "doc": "d"}]}, "bad_value", "expected text"),
        ({"pairs": [{**GOOD, "scale": "stars10"}]}, "unknown_scale", "stars10"),
        ({"pairs": [{**GOOD, "colour": "red"}]}, "bad_value", "unknown field"),
        ({"pairs": [{**GOOD, "doc": "d" * 201}]}, "too_long", "201 characters; at most 200"),
        ({"pairs": [{**GOOD, "id": 1}, {**GOOD, "id": 1}]}, "duplicate_id", "already used"),
        ({"pairs": ["x"]}, "malformed_row", "expected a JSON object"),
        (b'{"pairs": [{"query": "\\ud800", "doc": "d"}]}', "invalid_utf8", "lone surrogate"),
        ({"pairs": [{**GOOD, "query": "q " * 99}]}, "too_long", "fit the model"),
    ],
)
def test_bad_requests_are_400_with_the_reason(server, body, reason, message):
    status, out = call(server + "/score", body)
    assert status == 400, out
    assert set(out) == {"error", "details"}
    if reason is None:
        assert message in out["error"] and out["details"] == []
    else:
        bad = out["details"][-1]
        assert "pairs are bad" in out["error"] and bad["reason"] == reason
        pairs = json.loads(body)["pairs"] if isinstance(body, bytes) else body["pairs"]
        assert message in bad["message"] and bad["index"] == len(pairs) - 1


def test_other_4xx(server):
    status, out = call(server + "/score", {"pairs": [GOOD]}, content_type="text/plain")
    assert status == 415 and "application/json" in out["error"]
    status, out = call(server + "/score", b"{}", content_type="application/json; charset=latin-1")
    assert status == 415
    status, out = call(server + "/score", {"pairs": [{**GOOD, "doc": "x" * 5000}]})
    assert status == 413 and "4000" in out["error"]
    status, out = call(server + "/score")  # a GET
    assert status == 405 and out["error"]
    status, out = call(server + "/nowhere")
    assert status == 404 and out["error"]


def test_page_and_healthz(server):
    status, html = call(server + "/")
    assert status == 200 and html.startswith("<!doctype html>")
    for part in ('<form id="form"', 'id="query"', 'id="doc"', 'id="title"', 'id="scale"'):
        assert part in html
    assert '<option value="xhs5" selected>' in html
    assert "<script src" not in html and "<link" not in html  # self-contained
    assert ".innerHTML" not in html
    status, health = call(server + "/healthz")
    assert status == 200 and health["status"] == "ok" and health["scale"] == "xhs5"
    assert health["provenance"]["stage"] == "sft" and health["provenance"]["step"] == 3
    assert health["limits"] == {"max_pairs": 3, "max_field_chars": 200, "max_body_bytes": 4000}
