"""Scoring query-document pairs with a model bundle: `jaxgrm score`.

Input: one JSON object per non-blank line (lines count from 1). `query`, `doc`: required,
non-empty text. `id`: text or integer naming the pair, default its line number. `scale`: a
grade scale (SCALES), default the bundle's. `doc_title`, `qid`: optional (qid is copied to the
output). `label`, `source`, `steps`, `meta` are accepted so a builder's JSONL scores as is
(`meta.criteria` feeds the criteria block, as in training). Other fields make the row bad.

Output, one JSON object per scored pair, in input order: id, line, scale, [qid], grade, valid,
distribution, expected_grade, [trace]. `grade` is what the model answers decoding greedily in
the bundle's format (stop at `</answer>` or eos, at most `max_new_tokens`; LABEL_ONLY: 1 + the
longest answer), null when that is no grade of the scale (`valid` false). `trace` (`--trace`)
is the decoded response.

Distribution: the context is prompt + response up to its first `<answer>` tag (the answer
block's tag when the block parses), tag included; a response without one gets `<answer>`
appended (its stop token dropped), so invalid responses have a distribution too. LABEL_ONLY
uses the empty response. Each grade g is the whole token sequence ` g </answer>` (how
`format_answer(g)` encodes after its tag, as in training targets), so "-1" and "1" are distinct
answers of any token length: log p(g) = the sum of its token log-probs, p = softmax over the
scale's grades, expected_grade = sum_g g p(g). Numbers are rounded to 6 decimals.

Bad rows (REASONS): invalid JSON or UTF-8, a missing or empty query or doc, an unknown scale
(or none without a bundle default), a wrong type or unknown field, an id used on an earlier
line, a prompt too long for the model. Each is reported on stderr as `path:line: reason:
message` (the first MAX_REPORTED per reason), listed in `<output>.errors.jsonl` (rewritten each
run, removed when there are none) and counted per reason. The default policy is `raise`, as for
the data builders: the whole input is checked first and nothing is scored if a row is bad
(`too_long` shows only while scoring; the batches before it stay written). `skip` scores the
good rows.

Resume: ids already in the output are skipped and new rows appended, so an interrupted run,
rerun, has the rows of an uninterrupted one, once each. A last line without its newline (an
interrupted write) is dropped and its pair scored again; any other unreadable line stops the
run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxgrm.bundle import Bundle
from jaxgrm.data.schema import SCALES, RelevanceExample
from jaxgrm.model.decoder import init_cache, segment_mask, segment_positions
from jaxgrm.prompts import TraceFormat, format_answer, parse_ids, render_prompt
from jaxgrm.sampling import Sampler, SamplingConfig, gather_logprobs

REASONS = (
    "malformed_row", "invalid_utf8", "missing_field", "empty_query", "empty_doc",
    "unknown_scale", "bad_value", "duplicate_id", "too_long",
)  # fmt: skip
FIELDS = ("id", "query", "doc", "doc_title", "scale", "qid", "label", "source", "steps", "meta")
MAX_REPORTED = 10


@dataclasses.dataclass
class BadRow(Exception):
    """A rejected input row: its line, one of REASONS, what is wrong, and its id if known."""

    line: int
    reason: str
    message: str
    id: Any = None

    def where(self, path: str | os.PathLike) -> str:
        return f"{path}:{self.line}: {self.reason}: {self.message}"


class BadRowError(ValueError):
    """Raised under `on_bad_row="raise"`; `.rows` holds every bad row found."""

    def __init__(self, message: str, rows: Sequence[BadRow]):
        super().__init__(message)
        self.rows = list(rows)


@dataclasses.dataclass(frozen=True)
class Pair:
    """A valid input row: line, id (as given, or the line number), the example to render (its
    `label` is a placeholder: scoring never reads it) and the row's own qid, if any."""

    line: int
    id: str | int
    example: RelevanceExample
    qid: str | int | None = None


def id_key(pid: str | int) -> str:
    """Ids compare by JSON form: 7 and "7" are different ids."""
    return json.dumps(pid, ensure_ascii=False)


def _is_utf8(text: str) -> bool:  # False for a lone surrogate escaped in JSON (\ud800)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _pair(line: int, text: str, default_scale: str | None) -> Pair:
    def bad(reason: str, message: str, pid: Any = None) -> BadRow:
        return BadRow(line, reason, message, pid)

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad("malformed_row", f"not JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(obj, dict):
        raise bad("malformed_row", f"expected a JSON object, got {type(obj).__name__}")
    pid, qid = line if obj.get("id") is None else obj["id"], obj.get("qid")
    for name, value in (("id", pid), ("qid", qid)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | str)):
            raise bad("bad_value", f"field {name!r}: expected text or an integer, got {value!r}")
        if value == "" or (isinstance(value, str) and not _is_utf8(value)):
            raise bad("bad_value" if value == "" else "invalid_utf8", f"field {name!r}: {value!r}")
    if unknown := sorted(set(obj) - set(FIELDS)):
        raise bad("bad_value", f"unknown field(s) {unknown}; expected some of {FIELDS}", pid)
    texts = {}
    for name in ("query", "doc", "doc_title"):
        value = obj.get(name)
        if value is None and name != "doc_title":
            raise bad("missing_field", f"field {name!r} is missing", pid)
        if value is not None and not isinstance(value, str):
            raise bad("bad_value", f"field {name!r}: expected text, got {value!r:.60}", pid)
        if value is not None and not _is_utf8(value):
            raise bad("invalid_utf8", f"field {name!r} holds a lone surrogate", pid)
        if name != "doc_title" and not value.strip():
            raise bad(f"empty_{name}", f"field {name!r} is empty", pid)
        texts[name] = value or ""
    scale = obj.get("scale") or default_scale
    if scale is None:
        raise bad("missing_field", "field 'scale' is missing and the bundle has no default", pid)
    if not isinstance(scale, str) or scale not in SCALES:
        raise bad("unknown_scale", f"expected one of {', '.join(SCALES)}, got {scale!r:.60}", pid)
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise bad("bad_value", f"field 'meta': expected an object, got {meta!r:.60}", pid)
    label, qid_text = SCALES[scale].grades[0], str(qid if qid is not None else pid)
    example = RelevanceExample(
        qid=qid_text, **texts, label=label, scale=scale, source="score", meta=meta
    )
    return Pair(line, pid, example, qid)


def read_pairs(path: str | os.PathLike, default_scale: str | None):
    """(valid pairs, bad rows) of a JSONL input, each list in line order."""
    pairs: list[Pair] = []
    bad: list[BadRow] = []
    seen: dict[str, int] = {}
    for line, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark
            except UnicodeDecodeError as err:
                what = f"byte {err.start}: {raw[err.start : err.end]!r}"
                raise BadRow(line, "invalid_utf8", what) from None
            pair = _pair(line, text, default_scale)
            if (key := id_key(pair.id)) in seen:
                msg = f"id {pair.id!r} is already used on line {seen[key]}"
                raise BadRow(line, "duplicate_id", msg, pair.id)
        except BadRow as row:
            bad.append(row)
            continue
        seen[key] = line
        pairs.append(pair)
    return pairs, bad


def _buckets(cap: int) -> tuple[int, ...]:
    """Padded lengths 32, 64, ... below `cap`, then `cap`: one compile per bucket."""
    out = [32]
    while out[-1] * 2 < cap:
        out.append(out[-1] * 2)
    return (*[b for b in out if b < cap], cap)


@dataclasses.dataclass(frozen=True)
class Score:
    """One pair's result: the greedy answer's grade (None if invalid), {g: p(g)} over the
    scale's grades, the expected grade and the response's token ids."""

    grade: int | None
    distribution: dict[int, float]
    expected_grade: float
    trace_ids: list[int]

    @property
    def valid(self) -> bool:
        return self.grade is not None


class GradeScorer:
    """Greedy responses and grade distributions for batches of prompts, from a bundle.

    Every batch is padded to `batch_size` rows and candidates to the most grades x the longest
    answer over all SCALES, so the sampler compiles once per prompt bucket and the distribution
    forward once per context bucket, whatever the batch or the scale (`num_compiles`).
    """

    def __init__(self, bundle: Bundle, *, batch_size: int = 16, max_new_tokens: int = 256):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        self.bundle, self.batch_size = bundle, batch_size
        tok, cfg = bundle.tokenizer, bundle.model.cfg
        self.answer_id = tok.token_id("<answer>")
        self.stop_ids = (tok.eos_id, tok.token_id("</answer>"))
        self.candidates = {g: self._candidate(g) for scale in SCALES.values() for g in scale.grades}
        self.num_grades = max(len(s.grades) for s in SCALES.values())
        self.cand_len = max(len(c) for c in self.candidates.values())
        self.reasoning = bundle.prompt_config.format is TraceFormat.REASONING
        self.decode_tokens = max_new_tokens if self.reasoning else 1 + self.cand_len
        # prompt + response (<= decode_tokens) + an appended <answer> + a candidate must fit
        self.max_prompt = cfg.max_seq_len - self.decode_tokens - 1 - self.cand_len
        if self.max_prompt < 1:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                f"max_seq_len {cfg.max_seq_len}"
            )
        sampling = SamplingConfig(
            max_new_tokens=self.decode_tokens, temperature=0.0, stop_ids=self.stop_ids,
            pad_id=tok.pad_id, prompt_buckets=_buckets(cfg.max_seq_len - self.decode_tokens),
        )  # fmt: skip
        self.sampler = Sampler(bundle.model, sampling)
        self.ctx_buckets = _buckets(cfg.max_seq_len - self.cand_len)
        self.graphdef, self.params = nnx.split(bundle.model)
        self.num_compiles = 0  # distribution-forward traces caused by this scorer

    def _candidate(self, grade: int) -> list[int]:
        ids = self.bundle.tokenizer.encode(format_answer(grade))
        if len(ids) < 2 or ids[0] != self.answer_id:
            raise ValueError(f"{format_answer(grade)!r} does not encode as <answer> + its grade")
        return ids[1:]

    def prompt_ids(self, example: RelevanceExample) -> list[int]:
        return render_prompt(example, self.bundle.tokenizer, self.bundle.prompt_config).ids

    def context(self, prompt: list[int], trace: list[int]) -> list[int]:
        """prompt + the response up to and including its `<answer>` (see the module doc)."""
        if not self.reasoning:
            return [*prompt, self.answer_id]
        if self.answer_id in trace:  # the answer block's tag when it parses: it is unique
            return prompt + trace[: trace.index(self.answer_id) + 1]
        if trace and trace[-1] in self.stop_ids:
            trace = trace[:-1]
        return [*prompt, *trace, self.answer_id]

    def __call__(self, prompts: Sequence[list[int]], scales: Sequence[str]) -> list[Score]:
        """Scores of up to `batch_size` prompts, each on its own scale."""
        n, tok = len(prompts), self.bundle.tokenizer
        if not 0 < n <= self.batch_size:
            raise ValueError(f"expected 1 to {self.batch_size} prompts, got {n}")
        rows = [*prompts, *[prompts[0]] * (self.batch_size - n)]  # filler rows: fixed shapes
        out = self.sampler(self.params, rows, jax.random.key(0))
        tokens, mask = np.asarray(out.tokens_BM), np.asarray(out.mask_BM)
        traces = [tokens[i][mask[i]].tolist() for i in range(n)]
        parsed = [parse_ids(t, tok, scale=s) for t, s in zip(traces, scales, strict=True)]
        contexts = [self.context(p, t) for p, t in zip(prompts, traces, strict=True)]
        contexts += [contexts[0]] * (self.batch_size - n)
        length = next(b for b in self.ctx_buckets if b >= max(map(len, contexts)))
        b, g, c = self.batch_size, self.num_grades, self.cand_len
        ctx_BL = np.full((b, length), tok.pad_id, np.int32)
        valid_BL = np.zeros((b, length), bool)
        cand_BGC = np.full((b, g, c), tok.pad_id, np.int32)
        cmask_BGC = np.zeros((b, g, c), bool)
        for i, ids in enumerate(contexts):
            ctx_BL[i, length - len(ids) :], valid_BL[i, length - len(ids) :] = ids, True
            for j, grade in enumerate(SCALES[scales[i if i < n else 0]].grades):
                cand = self.candidates[grade]
                cand_BGC[i, j, : len(cand)], cmask_BGC[i, j, : len(cand)] = cand, True
        before = _TRACES[0]
        args = (ctx_BL, valid_BL, cand_BGC, cmask_BGC)
        logp_BG = np.asarray(_grade_logprobs(self.graphdef, self.params, *args))
        self.num_compiles += _TRACES[0] - before
        results = []
        for i in range(n):
            grades = SCALES[scales[i]].grades
            lp = logp_BG[i, : len(grades)].astype(np.float64)  # masked candidates excluded
            p = np.exp(lp - lp.max())
            p /= p.sum()
            dist = {gr: float(x) for gr, x in zip(grades, p, strict=True)}
            results.append(Score(parsed[i].grade, dist, float(np.dot(grades, p)), traces[i]))
        return results


_TRACES = [0]  # traces of _grade_logprobs, all scorers together


@functools.partial(jax.jit, static_argnums=0)
def _grade_logprobs(graphdef, params, ctx_BL, valid_BL, cand_BGC, cmask_BGC):
    """Summed log-prob [B, G] of each candidate after its row's left-padded context: prefill
    the context into a KV cache once, then run the G candidates of each row as a block of C
    tokens against copies of that cache. Jitted per architecture (graphdef), so scorers of
    models of one config share compiles."""
    _TRACES[0] += 1
    model = nnx.merge(graphdef, params)
    b, length = ctx_BL.shape
    _, g, c = cand_BGC.shape
    seg_BL = valid_BL.astype(jnp.int32)
    mask_BLS = jnp.pad(segment_mask(seg_BL), ((0, 0), (0, 0), (0, c)))
    positions_BL = segment_positions(seg_BL)
    cache = init_cache(model.cfg, b, length + c)
    hidden, cache = model(ctx_BL, positions_BL, mask_BLS, cache, 0, last_only=True)
    first_logits_BV = model.logits(hidden[:, -1])
    r = b * g  # R rows, row b * G + j = candidate j of row b
    cache = jax.tree.map(lambda x: jnp.repeat(x, g, axis=0), cache)
    tok_RC, valid_RL = cand_BGC.reshape(r, c), jnp.repeat(valid_BL, g, axis=0)
    positions_RC = valid_RL.sum(axis=1, dtype=jnp.int32)[:, None] + jnp.arange(c)[None]
    ctx_RCL = jnp.broadcast_to(valid_RL[:, None], (r, c, length))
    causal_RCC = jnp.broadcast_to(jnp.tril(jnp.ones((c, c), bool)), (r, c, c))
    mask_RCS = jnp.concatenate([ctx_RCL, causal_RCC], axis=-1)
    hidden_RCD, _ = model(tok_RC, positions_RC, mask_RCS, cache, length)
    lp_first = gather_logprobs(jnp.repeat(first_logits_BV, g, axis=0)[:, None], tok_RC[:, :1])
    lp_rest = gather_logprobs(model.logits(hidden_RCD[:, :-1]), tok_RC[:, 1:])
    lp_RC = jnp.concatenate([lp_first, lp_rest], axis=1)
    return jnp.where(cmask_BGC.reshape(r, c), lp_RC, 0.0).sum(-1).reshape(b, g)


@dataclasses.dataclass
class ScoreSummary:
    """rows: non-blank input lines = scored + already_done + sum(bad). invalid: rows scored in
    this run whose greedy answer was no grade of the scale."""

    rows: int = 0
    scored: int = 0
    already_done: int = 0
    invalid: int = 0
    bad: Counter = dataclasses.field(default_factory=Counter)
    errors_path: str = ""


def read_done_ids(output: str | os.PathLike, log: Callable[[str], None]) -> set[str]:
    """id_keys of the rows already in `output`, after dropping a partial last line."""
    path = Path(output)
    if not path.exists():
        return set()
    lines = path.read_bytes().split(b"\n")
    done, keep = set(), 0
    for i, raw in enumerate(lines, start=1):
        if i == len(lines):  # after the last newline: empty, or an interrupted write
            if raw:
                log(f"{path}:{i}: dropping a partial last line (an interrupted write)")
                with open(path, "r+b") as f:
                    f.truncate(keep)
            break
        keep += len(raw) + 1
        if not raw.strip():
            continue
        try:
            done.add(id_key(json.loads(raw)["id"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{path}:{i}: not a scored row, cannot resume (move the file away to start over)"
            ) from None
    return done


def _line(pair: Pair, s: Score, trace: bool, tokenizer) -> str:
    """The output line of a scored pair."""
    row: dict[str, Any] = {"id": pair.id, "line": pair.line, "scale": pair.example.scale}
    if pair.qid is not None:
        row["qid"] = pair.qid
    row["grade"], row["valid"] = s.grade, s.valid
    row["distribution"] = {str(g): round(p, 6) for g, p in s.distribution.items()}
    row["expected_grade"] = round(s.expected_grade, 6)
    if trace:
        row["trace"] = tokenizer.decode([t for t in s.trace_ids if t < tokenizer.vocab_size])
    return json.dumps(row, ensure_ascii=False) + "\n"


def score_file(
    scorer: GradeScorer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    trace: bool = False,
    on_bad_row: str = "raise",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ScoreSummary:
    """Score every pair of `input_path` not yet in `output_path`, appending (module doc)."""
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    pairs, bad = read_pairs(input_path, scorer.bundle.scale)
    done = read_done_ids(output_path, log)
    pending = [p for p in pairs if id_key(p.id) not in done]
    errors = Path(f"{os.fspath(output_path)}.errors.jsonl")
    summary = ScoreSummary(len(pairs) + len(bad), 0, len(pairs) - len(pending))
    summary.errors_path = os.fspath(errors)

    def reject(row: BadRow) -> None:
        summary.bad[row.reason] += 1
        if summary.bad[row.reason] <= MAX_REPORTED:
            log(row.where(input_path))
        elif summary.bad[row.reason] == MAX_REPORTED + 1:
            log(f"{input_path}: more {row.reason} rows: all are listed in {errors}")
        if on_bad_row == "raise" and row is bad[-1]:
            raise BadRowError(
                f"{bad[0].where(input_path)}\n{len(bad)} bad row(s), listed in {errors}; fix "
                "them, or rerun with --on-bad-row=skip to score the good rows and count the others",
                bad,
            )

    try:
        for row in bad:
            reject(row)
        tok, batch = scorer.bundle.tokenizer, []
        with (
            open(output_path, "a", encoding="utf-8") as out,
            tqdm(total=len(pending), unit="pair", desc="scoring", disable=not progress) as bar,
        ):
            for k, pair in enumerate(pending):
                ids = scorer.prompt_ids(pair.example)
                if len(ids) <= scorer.max_prompt:
                    batch.append((pair, ids))
                else:
                    msg = f"prompt of {len(ids)} tokens; at most {scorer.max_prompt} fit the model"
                    bad.append(BadRow(pair.line, "too_long", msg, pair.id))
                    reject(bad[-1])
                    bar.update(1)
                if batch and (len(batch) == scorer.batch_size or k == len(pending) - 1):
                    scores = scorer([i for _, i in batch], [p.example.scale for p, _ in batch])
                    pairs_scores = zip(batch, scores, strict=True)
                    out.write("".join(_line(p, s, trace, tok) for (p, _), s in pairs_scores))
                    out.flush()
                    summary.scored += len(batch)
                    summary.invalid += sum(not s.valid for s in scores)
                    bar.update(len(batch))
                    batch = []
    finally:
        if bad:
            rows = sorted(bad, key=lambda r: r.line)
            lines = [json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n" for r in rows]
            errors.write_text("".join(lines), encoding="utf-8")
        else:
            errors.unlink(missing_ok=True)
    return summary
