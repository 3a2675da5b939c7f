"""Relevance scoring over HTTP: `jaxgrm serve --ckpt DIR` (Flask on werkzeug's threaded server).

    POST /score    {"pairs": [{"query", "doc", optional "doc_title", "scale", "id", ...}],
                    optional "trace": bool}
                   -> {"results": [{"index", "id", "scale", ["qid"], "grade", "valid",
                       "distribution", "expected_grade", ["trace", "steps"]}, ...]}
    GET  /         a self-contained page: type a query and a document, read the trace step by
                   step with the grade and the distribution
    GET  /healthz  {"status": "ok", "provenance": ..., "scale": ..., "format": ..., "limits": ...}

Each pair is validated exactly as a row of `jaxgrm score` is (`jaxgrm.score._pair`: the same
fields, reasons and messages); a pair's default `id` is its index in `pairs`. On top of that,
ServeConfig limits the pairs per request, the characters of each text field and the body bytes.
Errors answer JSON `{"error": ..., "details": [...]}`: 400 for a body that is not UTF-8 or not
JSON, a wrong shape, bad pairs (`details` has one `{"index", "reason", "message", "id"}` per
bad pair), too many pairs or too long fields; 413 for a body over `max_body_bytes`; 415 for a
content type other than `application/json` (charset utf-8, if given).

Results are those of `jaxgrm score` (same rounding and fields), `line` replaced by `index`.
With `"trace": true` each result also has the decoded response and its `steps`: one
`{"step", "status", "text", "conclusion"}` per step of the format (status ok / missing /
malformed; text and conclusion null unless ok, conclusion null when the step has none).

The scorer runs under a lock: requests are served by threads but JAX calls never interleave.
Each prompt bucket compiles on first use, so the first requests are slow.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from jaxgrm.data.schema import SCALES, STEP_NAMES
from jaxgrm.prompts import BlockStatus, TraceFormat, parse_ids
from jaxgrm.score import BadRow, GradeScorer, Pair, _line, _pair, id_key

TEXT_FIELDS = ("query", "doc", "doc_title")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Request limits: pairs per request, characters per text field, bytes per body."""

    max_pairs: int = 64
    max_field_chars: int = 20_000
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self):
        if min(self.max_pairs, self.max_field_chars, self.max_body_bytes) < 1:
            raise ValueError(f"limits must be >= 1: {self}")


class RequestError(Exception):
    """A request answered with `status` and JSON {"error": message, "details": details}."""

    def __init__(self, status: int, message: str, details: list | None = None):
        super().__init__(message)
        self.status, self.message, self.details = status, message, details or []


def _json(obj: Any, status: int = 200) -> Response:
    body = json.dumps(obj, ensure_ascii=False)
    return Response(body, status=status, mimetype="application/json")


def _bad(index: int, reason: str, message: str, pid: Any = None) -> dict:
    return {"index": index, "reason": reason, "message": message, "id": pid}


def parse_request(body: bytes, content_type: str | None, scorer: GradeScorer, cfg: ServeConfig):
    """(pairs with their prompt ids, trace flag) of a /score body, or RequestError."""
    mimetype, _, params = (content_type or "").partition(";")
    charset = next(
        (v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params.split(";"))
         if k.strip().lower() == "charset"),
        "utf-8",
    )  # fmt: skip
    if mimetype.strip().lower() != "application/json" or charset not in ("utf-8", "utf8"):
        raise RequestError(415, f"expected Content-Type application/json, got {content_type!r}")
    if len(body) > cfg.max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes; at most {cfg.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"body is not UTF-8 (byte {err.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"body is not JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"expected a JSON object, got {type(obj).__name__}")
    if unknown := sorted(set(obj) - {"pairs", "trace"}):
        raise RequestError(400, f"unknown field(s) {unknown}; expected 'pairs' and 'trace'")
    trace = obj.get("trace", False)
    if not isinstance(trace, bool):
        raise RequestError(400, f"field 'trace': expected true or false, got {trace!r:.60}")
    rows = obj.get("pairs")
    if not isinstance(rows, list) or not rows:
        raise RequestError(400, "field 'pairs': expected a non-empty list of pair objects")
    if len(rows) > cfg.max_pairs:
        raise RequestError(400, f"{len(rows)} pairs; at most {cfg.max_pairs} per request")
    pairs, details, seen = [], [], {}
    for index, row in enumerate(rows):
        if isinstance(row, dict):
            pid = row.get("id")
            long = [
                f"field {name!r} has {len(row[name])} characters; at most {cfg.max_field_chars}"
                for name in TEXT_FIELDS
                if isinstance(row.get(name), str) and len(row[name]) > cfg.max_field_chars
            ]
            if long:
                details.append(_bad(index, "too_long", "; ".join(long), pid))
                continue
        try:  # the row checks of `jaxgrm score`, on the pair re-encoded as one JSON line
            pair = _pair(index, json.dumps(row), scorer.bundle.scale)
            if (key := id_key(pair.id)) in seen:
                msg = f"id {pair.id!r} is already used by pair {seen[key]}"
                raise BadRow(index, "duplicate_id", msg, pair.id)
            ids = scorer.prompt_ids(pair.example)
            if len(ids) > scorer.max_prompt:
                msg = f"prompt of {len(ids)} tokens; at most {scorer.max_prompt} fit the model"
                raise BadRow(index, "too_long", msg, pair.id)
        except BadRow as bad:
            details.append(_bad(index, bad.reason, bad.message, bad.id))
            continue
        seen[key] = index
        pairs.append((pair, ids))
    if details:
        raise RequestError(400, f"{len(details)} of {len(rows)} pairs are bad", details)
    return pairs, trace


def trace_steps(trace_ids: list[int], tokenizer, scale: str) -> list[dict]:
    """One {"step", "status", "text", "conclusion"} per step name (see the module doc)."""
    parsed = parse_ids(trace_ids, tokenizer, scale=scale)
    out = []
    for name in STEP_NAMES:
        ok = parsed.status[name] is BlockStatus.OK
        conclusion = parsed.conclusions.get(name) if ok else None
        out.append({
            "step": name,
            "status": parsed.status[name].value,
            "text": parsed.steps_text.get(name) if ok else None,
            "conclusion": dict(conclusion) if conclusion else None,
        })  # fmt: skip
    return out


def create_app(scorer: GradeScorer, config: ServeConfig | None = None) -> Flask:
    """The Flask app serving `scorer` under `config`'s limits."""
    cfg = config or ServeConfig()
    app = Flask("jaxgrm.serve")
    # werkzeug refuses longer bodies (413) also when they come without a Content-Length
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    lock = threading.Lock()
    tok, bundle = scorer.bundle.tokenizer, scorer.bundle
    reasoning = bundle.prompt_config.format is TraceFormat.REASONING

    @app.errorhandler(RequestError)
    def request_error(err: RequestError):
        return _json({"error": err.message, "details": err.details}, err.status)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        if isinstance(err, RequestEntityTooLarge):
            message = f"body over {cfg.max_body_bytes} bytes"
        else:
            message = err.description or err.name
        return _json({"error": message, "details": []}, err.code or 500)

    @app.post("/score")
    def score():
        if request.content_length is not None and request.content_length > cfg.max_body_bytes:
            raise RequestError(413, f"body of {request.content_length} bytes; "
                               f"at most {cfg.max_body_bytes}")  # fmt: skip
        body = request.get_data(cache=False)
        pairs, trace = parse_request(body, request.headers.get("Content-Type"), scorer, cfg)
        results = []
        for start in range(0, len(pairs), scorer.batch_size):
            batch: list[tuple[Pair, list[int]]] = pairs[start : start + scorer.batch_size]
            with lock:
                scores = scorer([ids for _, ids in batch], [p.example.scale for p, _ in batch])
            for (pair, _), s in zip(batch, scores, strict=True):
                row = json.loads(_line(pair, s, trace, tok))
                row = {"index": row.pop("line"), **row}
                if trace:
                    row["steps"] = trace_steps(s.trace_ids, tok, pair.example.scale)
                results.append(row)
        return _json({"results": results})

    @app.get("/healthz")
    def healthz():
        return _json({
            "status": "ok",
            "provenance": bundle.provenance,
            "scale": bundle.scale,
            "format": bundle.prompt_config.format.value,
            "limits": dataclasses.asdict(cfg),
        })  # fmt: skip

    @app.get("/")
    def page():
        scales = "".join(
            f'<option value="{name}"{" selected" if name == bundle.scale else ""}>{name} '
            f"({s.grades[0]}..{s.grades[-1]})</option>"
            for name, s in SCALES.items()
        )
        html = PAGE.replace("{{SCALES}}", scales).replace("{{STEPS}}", json.dumps(reasoning))
        return Response(html, mimetype="text/html")

    return app


def make_server(
    scorer: GradeScorer,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
):
    """A threaded werkzeug server of `create_app(scorer, config)`; port 0: the OS picks one
    (`server.port`). Run it with `serve_forever()`, stop it with `shutdown()`."""
    from werkzeug.serving import make_server as _make_server

    return _make_server(host, port, create_app(scorer, config), threaded=True)


# The page: inline CSS and JS only. Everything the model or the user wrote is set through
# textContent / value, never innerHTML. URL parameters q, doc, title, scale fill the form, and
# with q and doc present the page scores them at once (a link to a scored pair).
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>jaxgrm relevance</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:920px;margin:20px auto;padding:0 16px;
color:#1d232a}
h1{font-size:20px;margin:0 0 12px}
label{display:block;font-weight:600;margin:8px 0 3px}
input,textarea,select{width:100%;box-sizing:border-box;font:inherit;padding:6px;
border:1px solid #b8c0c8;border-radius:4px}
textarea{min-height:64px}
.row{display:flex;gap:12px}.row>div{flex:1}
button{margin-top:10px;padding:7px 18px;font:inherit;font-weight:600;border:0;border-radius:4px;
background:#2457a6;color:#fff;cursor:pointer}
button:disabled{background:#8aa0c0}
#error{color:#a4161a;white-space:pre-wrap;margin-top:10px}
.step{border:1px solid #d4dae0;border-left:4px solid #2457a6;border-radius:4px;
padding:6px 10px;margin:6px 0}
.step.missing,.step.malformed{border-left-color:#a4161a}
.step h3{margin:0 0 4px;font-size:14px}
.prose{white-space:pre-wrap}
.concl{margin:6px 0 0;padding:0;list-style:none;font-size:14px}
.concl b{color:#44505c}
#grade{font-size:18px;margin:12px 0 4px}
.bar{display:flex;align-items:center;gap:8px;margin:3px 0;font-size:14px}
.bar span{width:32px;text-align:right}
.bar div{height:14px;background:#2457a6;border-radius:2px}
.raw{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;color:#44505c}
</style></head><body>
<h1>jaxgrm: query-document relevance</h1>
<form id="form">
<label for="query">Query</label><input id="query" name="query" required>
<div class="row"><div><label for="title">Document title (optional)</label>
<input id="title" name="title"></div>
<div><label for="scale">Grade scale</label><select id="scale" name="scale">{{SCALES}}</select>
</div></div>
<label for="doc">Document</label><textarea id="doc" name="doc" required></textarea>
<button id="submit" type="submit">Score</button>
</form>
<div id="error" role="alert"></div>
<div id="result" hidden>
<div id="steps"></div>
<div id="grade"></div>
<div id="dist"></div>
<details><summary>Raw trace</summary><div id="raw" class="raw"></div></details>
</div>
<script>
"use strict";
const REASONING = {{STEPS}};
const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function show(r) {
  const steps = $("steps"); steps.replaceChildren();
  for (const s of (REASONING ? r.steps : [])) {
    const box = el("div", "step " + s.status);
    box.dataset.step = s.step;
    box.append(el("h3", null, s.step + (s.status === "ok" ? "" : " (" + s.status + ")")));
    if (s.text !== null) {
      const cut = s.text.lastIndexOf("=>");
      box.append(el("div", "prose", cut >= 0 ? s.text.slice(0, cut).trim() : s.text));
    }
    if (s.conclusion) {
      const ul = el("ul", "concl");
      for (const [k, v] of Object.entries(s.conclusion)) {
        const li = el("li"); li.append(el("b", null, k + ": "), document.createTextNode(v));
        ul.append(li);
      }
      box.append(ul);
    } else if (s.status === "ok") {
      box.append(el("div", "concl", "(no conclusion)"));
    }
    steps.append(box);
  }
  const g = $("grade");
  g.textContent = r.valid ? "Grade: " + r.grade : "Grade: none (the model wrote no valid grade)";
  g.append(el("span", null, "  (expected " + r.expected_grade.toFixed(3) + ", scale "
    + r.scale + ")"));
  const dist = $("dist"); dist.replaceChildren();
  for (const [grade, p] of Object.entries(r.distribution).sort((a, b) => a[0] - b[0])) {
    const row = el("div", "bar"); row.dataset.grade = grade;
    const bar = el("div"); bar.style.width = Math.max(1, Math.round(p * 400)) + "px";
    row.append(el("span", null, grade), bar, el("span", null, p.toFixed(3)));
    dist.append(row);
  }
  $("raw").textContent = r.trace;
  $("result").hidden = false;
}
async function submit(ev) {
  if (ev) ev.preventDefault();
  $("error").textContent = ""; $("submit").disabled = true;
  const pair = {query: $("query").value, doc: $("doc").value, scale: $("scale").value};
  if ($("title").value) pair.doc_title = $("title").value;
  try {
    const res = await fetch("score", {method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({pairs: [pair], trace: true})});
    const body = await res.json();
    if (!res.ok) {
      const why = (body.details || []).map((d) => d.reason + ": " + d.message).join("\\n");
      throw new Error(res.status + " " + body.error + (why ? "\\n" + why : ""));
    }
    show(body.results[0]);
    document.body.dataset.state = "scored";
  } catch (err) {
    $("error").textContent = String(err.message || err);
    document.body.dataset.state = "error";
  } finally {
    $("submit").disabled = false;
  }
}
$("form").addEventListener("submit", submit);
const params = new URLSearchParams(location.search);
for (const [name, id] of [["q", "query"], ["doc", "doc"], ["title", "title"],
                          ["scale", "scale"]]) {
  if (params.has(name)) $(id).value = params.get(name);
}
if (params.get("q") && params.get("doc")) submit();
</script></body></html>
"""
