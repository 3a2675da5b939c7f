"""Teacher traces for SFT, and the SFT experiment (`jaxgrm sft`).

Traces come from the synthetic world's rule teacher (`world_traces`) or from any model bundle
through the sampler with rejection sampling (`model_traces`): G traces per pair, the first whose
parsed grade equals the human grade is kept, and pairs with none are listed in the stats, never
silently dropped. An imported HF checkpoint becomes a bundle with `jaxgrm.bundle.save_bundle`.

A trace data set is JSONL, one `TraceRecord` per line: the RelevanceExample fields (its JSON form)
plus

    "trace":        the response text (tagged steps and answer), what SFT trains on
    "steps_right":  {"step1": true, ...}: which steps are right (world teacher: known; model:
                    the step verifiers' verdict, null where a step is unverifiable)
    "provenance":   {"teacher": "world-teacher" or the bundle path, "checkpoint_step": int or
                    null, "sampling": {temperature, top_k, top_p, samples_per_pair,
                    max_new_tokens, seed} or null, "error_rate": float or null, ...}

and `<path>.meta.json` holds {"records", "provenance", "stats"} (stats of a model teacher: the
acceptance rate per grade and overall, and the pairs with no accepted trace).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxgrm.data.schema import STEP_NAMES, RelevanceExample
from jaxgrm.data.world import WorldConfig, generate, teacher_trace
from jaxgrm.model import ModelConfig
from jaxgrm.prompts import PromptConfig, TraceFormat, render_prompt, render_target
from jaxgrm.sampling import DEFAULT_BUCKETS, Sampler, SamplingConfig
from jaxgrm.train.mesh import MeshConfig, auto_mesh
from jaxgrm.train.sft import SFTConfig

WORLD_TEACHER = "world-teacher"
META_SUFFIX = ".meta.json"
_RECORD_KEYS = ("trace", "steps_right", "provenance")


@dataclasses.dataclass(frozen=True)
class TraceRecord:
    """One teacher trace for one pair (see the module docstring for the JSON form)."""

    example: RelevanceExample
    trace: str
    provenance: Mapping[str, Any]
    steps_right: Mapping[str, bool | None] | None = None

    def to_json(self) -> str:
        row = dataclasses.asdict(self.example)
        clash = set(row) & set(_RECORD_KEYS)
        if clash:  # RelevanceExample has no such fields; guard against a schema change
            raise ValueError(f"RelevanceExample fields {sorted(clash)} clash with trace fields")
        row.update(trace=self.trace, steps_right=self.steps_right, provenance=self.provenance)
        return json.dumps(row, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TraceRecord:
        d = dict(d)
        if not isinstance(d.get("trace"), str):
            raise ValueError("a trace record needs a text field 'trace'")
        trace, right, prov = d.pop("trace"), d.pop("steps_right", None), d.pop("provenance", {})
        return cls(RelevanceExample.from_dict(d), trace, dict(prov or {}), right)

    def to_example(self) -> RelevanceExample:
        """The example with the trace in `meta["trace"]` (what `run_sft` targets read)."""
        return dataclasses.replace(self.example, meta={**self.example.meta, "trace": self.trace})


# ---- the world teacher -------------------------------------------------------------------------
def world_traces(
    examples: Sequence[RelevanceExample],
    error_rate: float,
    seed: int = 0,
    prose: bool = True,
    propagation: float = 0.5,
) -> list[TraceRecord]:
    """One world-teacher trace per example, every one kept (wrong steps included: the record
    says which steps are right). Same (examples, error_rate, seed, prose) -> same traces."""
    rng = random.Random(seed)
    prov = {
        "teacher": WORLD_TEACHER,
        "checkpoint_step": None,
        "sampling": None,
        "error_rate": float(error_rate),
        "propagation": float(propagation),
        "prose": bool(prose),
        "seed": int(seed),
    }
    out = []
    for ex in examples:
        text, right = teacher_trace(ex, rng, error_rate, propagation, prose=prose)
        out.append(TraceRecord(ex, text, prov, dict(right)))
    return out


# ---- a rule teacher for real data --------------------------------------------------------------
LABEL_TEACHER = "label-rule-teacher"
_STOPWORDS = frozenset(
    {"a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "how", "in", "is", "it", "of",
     "on", "or", "the", "to", "what", "when", "where", "which", "who", "why", "with", "without",
     "vs"}
)  # fmt: skip
_WORD_RE = re.compile(r"[^\W_]+")
_CJK_RUN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def query_terms(query: str, max_terms: int = 5) -> list[str]:
    """Key terms of a query: its words without stop words (Latin script), or two-character
    pieces of its CJK runs (Chinese has no spaces); distinct, in query order, at most
    `max_terms` (the last ones kept: the head noun of a product query comes last)."""
    from jaxgrm.rewards import normalize

    text = normalize(query)
    terms = []
    for word in _WORD_RE.findall(text):
        runs = _CJK_RUN_RE.findall(word)
        if runs:
            terms += [r[i : i + 2] for r in runs for i in range(0, len(r), 2)]
        elif word not in _STOPWORDS and (len(word) > 1 or word.isdigit()):
            terms.append(word)
    terms = list(dict.fromkeys(terms))
    return terms[-max_terms:]


def label_trace(example: RelevanceExample) -> tuple[str, dict[str, bool]]:
    """A reasoning trace for a real pair that is right by construction under the real-data step
    verifiers (rewards.py): step1 names query terms (a subject and the other terms as
    constraints), step2 which of them occur in the document, step3 a rule of the scale's criteria
    whose bound holds for the human grade (the rule's coverage matches step2 where it can),
    then the human grade. The grade is an input: this teacher rationalises a known label, it
    does not predict one (method.md: real data has grades, not step truth)."""
    from jaxgrm.prompts import criteria_for, format_trace
    from jaxgrm.rewards import bound_holds, contains, parse_bound

    terms = query_terms(example.query) or [example.query.strip()]
    doc = f"{example.doc_title}\n{example.doc}"
    present = [t for t in terms if contains(doc, t)]
    absent = [t for t in terms if t not in present]
    rules = []
    for line in criteria_for(example):
        name, _, bound = line.partition("-> bound:")
        parsed = parse_bound(bound)
        if parsed is not None and bound_holds(parsed, example.label):
            rules.append((name.split(":")[0].strip(), bound.strip()))
    if not rules:  # a scale without criteria: state the grade itself
        rules = [("grade", f"= {example.label}")]
    # No term present: the first (lowest) rule that holds; all present: the last; else between.
    pick = 0 if not present else len(rules) - 1 if not absent else min(1, len(rules) - 1)
    rule, bound = rules[pick]
    # Subject: the first CJK piece (Chinese puts the topic first), else the last word without
    # digits (the head noun of "cordless drill 18v"); the other terms are constraints.
    cjk = [t for t in terms if _CJK_RUN_RE.fullmatch(t)]
    words = [t for t in terms if not any(c.isdigit() for c in t)]
    subject = cjk[0] if cjk else words[-1] if words else terms[-1]
    steps = {
        "step1": {
            "subject": subject,
            "constraints": [t for t in terms if t != subject],
            "intent": "find",
        },
        "step2": {"present": present, "absent": absent},
        "step3": {"rule": rule, "bound": bound},
    }
    return format_trace(steps, example.label), dict.fromkeys(STEP_NAMES, True)


def label_traces(examples: Sequence[RelevanceExample]) -> list[TraceRecord]:
    """One `label_trace` per example (needs the human grade), all kept."""
    prov = {"teacher": LABEL_TEACHER, "checkpoint_step": None, "sampling": None}
    out = []
    for ex in examples:
        text, right = label_trace(ex)
        out.append(TraceRecord(ex, text, prov, right))
    return out


# ---- a model teacher, with rejection sampling --------------------------------------------------
def _load(bundle) -> tuple[Any, str]:
    from jaxgrm.bundle import Bundle, load_bundle

    if isinstance(bundle, Bundle):
        return bundle, str(bundle.provenance.get("path") or "bundle")
    return load_bundle(bundle), os.fspath(bundle)


def model_traces(
    bundle,
    examples: Sequence[RelevanceExample],
    *,
    samples_per_pair: int = 8,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    teacher: str | None = None,
) -> tuple[list[TraceRecord], dict[str, Any]]:
    """Traces from a model (a `Bundle` or a bundle directory) with rejection sampling.

    G = samples_per_pair traces per pair, drawn in batches of `batch_size` pairs; the first
    trace whose parsed grade equals the label is kept. Returns (records, stats): stats has
    `pairs`, `accepted`, `acceptance_rate`, `sample_acceptance_rate` (over all G traces),
    `invalid_rate` (traces without a grade), `per_grade` {grade: {pairs, accepted,
    acceptance_rate}} and `rejected`: every pair with no accepted trace, as {index, qid, label}
    (index into `examples`). `teacher` names the model in the provenance (default: the path).
    """
    from jaxgrm.rl.rollout import rollout

    if samples_per_pair < 1 or batch_size < 1:
        raise ValueError("samples_per_pair and batch_size must be >= 1")
    bundle, where = _load(bundle)
    tok, model = bundle.tokenizer, bundle.model
    sampling = {
        "temperature": float(temperature),
        "top_k": int(top_k),
        "top_p": float(top_p),
        "samples_per_pair": int(samples_per_pair),
        "max_new_tokens": int(max_new_tokens),
        "seed": int(seed),
    }
    prov = {
        "teacher": teacher or where,
        "checkpoint_step": bundle.provenance.get("step"),
        "checkpoint_stage": bundle.provenance.get("stage"),
        "sampling": sampling,
        "error_rate": None,
    }
    stop = (tok.eos_id, tok.token_id("</answer>"))
    sampler = Sampler(
        model,
        SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            num_samples=samples_per_pair, stop_ids=stop, pad_id=tok.pad_id,
            prompt_buckets=prompt_buckets,
        ),
    )  # fmt: skip
    from flax import nnx

    params = nnx.state(model)
    g = samples_per_pair
    records, rejected = [], []
    per_grade: dict[int, list[int]] = {}  # grade -> [pairs, accepted]
    right_samples = invalid = 0
    for b, start in enumerate(range(0, len(examples), batch_size)):
        chunk = list(examples[start : start + batch_size])
        prompts = [render_prompt(ex, tok, bundle.prompt_config).ids for ex in chunk]
        r = rollout(
            sampler, params, tok, chunk, prompts, jax.random.fold_in(jax.random.key(seed), b)
        )
        for i, ex in enumerate(chunk):
            counts = per_grade.setdefault(ex.label, [0, 0])
            counts[0] += 1
            rows = range(i * g, (i + 1) * g)
            right = [j for j in rows if r.parsed[j].grade == ex.label]
            right_samples += len(right)
            invalid += sum(r.parsed[j].grade is None for j in rows)
            if not right:
                rejected.append({"index": start + i, "qid": ex.qid, "label": ex.label})
                continue
            j = right[0]
            counts[1] += 1
            ids = r.tokens_BM[j][r.mask_BM[j]].tolist()
            ids = [t for t in ids if t not in (tok.eos_id, tok.pad_id)]
            verdicts = {
                name: None if v < 0 else bool(v)
                for name, v in zip(STEP_NAMES, r.verdicts_BP[j].tolist(), strict=True)
            }
            records.append(TraceRecord(ex, tok.decode(ids), prov, verdicts))
    n = len(examples)
    stats = {
        "pairs": n,
        "accepted": len(records),
        "acceptance_rate": len(records) / max(n, 1),
        "sample_acceptance_rate": right_samples / max(n * g, 1),
        "invalid_rate": invalid / max(n * g, 1),
        "per_grade": {
            str(grade): {"pairs": p, "accepted": a, "acceptance_rate": a / p}
            for grade, (p, a) in sorted(per_grade.items())
        },
        "rejected": rejected,
    }
    return records, stats


# ---- the data set on disk ----------------------------------------------------------------------
def _common_provenance(records: Sequence[TraceRecord]) -> Any:
    seen: list = []
    for rec in records:
        if rec.provenance not in seen:
            seen.append(dict(rec.provenance))
    return seen[0] if len(seen) == 1 else seen


def write_traces(
    path: str | os.PathLike,
    records: Sequence[TraceRecord],
    stats: Mapping[str, Any] | None = None,
) -> Path:
    """Write records as JSONL to `path` and {records, provenance, stats} to `path.meta.json`
    (the provenance shared by all records, or the list of distinct ones)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(rec.to_json() + "\n")
    os.replace(tmp, path)
    meta = {"records": len(records), "provenance": _common_provenance(records), "stats": stats}
    meta_path = path.with_name(path.name + META_SUFFIX)
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_trace_records(path: str | os.PathLike) -> list[TraceRecord]:
    """The records of a trace JSONL (ValueError naming the line when one is bad)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(TraceRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError) as err:
                raise ValueError(f"{path}:{n}: bad trace record: {err}") from None
    return out


def read_traces(path: str | os.PathLike) -> list[RelevanceExample]:
    """The examples of a trace JSONL with `meta["trace"]` set, ready for `run_sft`."""
    return [rec.to_example() for rec in read_trace_records(path)]


def read_trace_meta(path: str | os.PathLike) -> dict[str, Any]:
    """`path.meta.json` of a trace data set."""
    path = Path(path)
    return json.loads(path.with_name(path.name + META_SUFFIX).read_text(encoding="utf-8"))


def read_examples(path: str | os.PathLike) -> list[RelevanceExample]:
    """A JSONL of trace records or of plain RelevanceExample rows (labels are what counts)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                for key in _RECORD_KEYS:
                    row.pop(key, None)
                out.append(RelevanceExample.from_dict(row))
    return out


# ---- the SFT experiment (`jaxgrm sft`) ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SFTExperiment:
    """SFT on teacher traces, with periodic greedy validation; ends in a bundle.

    traces: a trace JSONL (write_traces) to train on; None: the world teacher's traces of
    `world`'s train split (teacher_error_rate, default the world's; teacher_prose; teacher_seed),
    also written to WORKDIR/traces.jsonl. validation: a JSONL of examples (or trace records) to
    validate on; None: the world's validation split when training on the world, else none.
    eval_examples / eval_max_new_tokens / eval_buckets: the greedy validation decode, run every
    `sft.eval_every` steps. model.vocab_size is set from the tokenizer (trained on the first
    `tokenizer_texts` examples, or read from WORKDIR/tokenizer.model when there).
    """

    world: WorldConfig = WorldConfig.small()
    traces: str | None = None
    validation: str | None = None
    model: ModelConfig = ModelConfig.tiny()
    vocab_size: int = 1024
    tokenizer_texts: int = 3000
    prompt: PromptConfig = PromptConfig(instructions=False, doc_budget=96)
    sft: SFTConfig = SFTConfig()
    teacher_error_rate: float | None = None
    teacher_prose: bool = True
    teacher_seed: int = 0
    eval_examples: int = 300
    eval_max_new_tokens: int = 96
    eval_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    mesh: MeshConfig = MeshConfig()


def _train_and_validation(cfg: SFTExperiment, workdir: str):
    if cfg.traces is not None:
        train = read_traces(cfg.traces)
        val = read_examples(cfg.validation) if cfg.validation else []
        return train, val, {"traces": os.path.abspath(cfg.traces)}
    splits = generate(cfg.world)
    error = (
        cfg.world.teacher_error_rate if cfg.teacher_error_rate is None else cfg.teacher_error_rate
    )
    records = world_traces(
        splits["train"], error, cfg.teacher_seed, cfg.teacher_prose, cfg.world.teacher_propagation
    )
    path = os.path.join(workdir, "traces.jsonl")
    if jax.process_index() == 0 and not os.path.exists(path):
        write_traces(path, records)
    val = read_examples(cfg.validation) if cfg.validation else splits["validation"]
    return (
        [rec.to_example() for rec in records],
        val,
        {"traces": WORLD_TEACHER, "world_seed": cfg.world.seed},
    )


def trace_tokenizer(
    examples: Sequence[RelevanceExample],
    prompt: PromptConfig,
    vocab_size: int,
    num_texts: int,
    path: str,
    character_coverage: float = 0.9995,
):
    """The tokenizer at `path`, or a SentencePiece model trained on the rendered prompts and
    traces (`meta["trace"]`) of the first `num_texts` examples and saved there. Characters
    outside `character_coverage` become bytes (Chinese text needs a lower coverage or a larger
    vocabulary)."""
    from jaxgrm.prompts import render_prompt_text
    from jaxgrm.tokenizer import SentencePieceTokenizer, load_tokenizer

    if os.path.exists(path):
        return load_tokenizer(path)
    texts = []
    for ex in examples[:num_texts]:
        block = f"{ex.doc_title}\n{ex.doc}" if ex.doc_title else ex.doc
        texts += [render_prompt_text(ex, block, prompt), ex.meta["trace"]]
    tok = SentencePieceTokenizer.train(
        texts, vocab_size=vocab_size, character_coverage=character_coverage
    )
    if jax.process_index() == 0:
        tok.save(path)
    return tok


def greedy_evaluator(
    model,
    tok,
    prompt: PromptConfig,
    examples: Sequence[RelevanceExample],
    max_new_tokens: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    seed: int = 0,
    prefix: str = "val/",
) -> Callable[[Any, int], dict] | None:
    """evaluate(params, step) -> {prefix + metric: value}: greedy decoding of `examples` with
    `model`'s graph and the given params, metrics per grade scale (`prefix + scale + "/"` when
    there are several). None when there are no examples. For run_sft's `evaluate`."""
    from jaxgrm.rl.rollout import evaluate_policy

    examples = list(examples)
    if not examples:
        return None
    stop = (tok.eos_id, tok.token_id("</answer>"))
    greedy = Sampler(
        model,
        SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=0.0, num_samples=1,
            stop_ids=stop, pad_id=tok.pad_id, prompt_buckets=tuple(buckets),
        ),
    )  # fmt: skip
    by_scale: dict[str, list[RelevanceExample]] = {}
    for ex in examples:
        by_scale.setdefault(ex.scale, []).append(ex)
    prompts = {s: [render_prompt(ex, tok, prompt).ids for ex in exs] for s, exs in by_scale.items()}

    def evaluate(params, step: int) -> dict:
        out = {}
        key = jax.random.fold_in(jax.random.key(seed + 1), step)
        for scale, exs in by_scale.items():
            report = evaluate_policy(greedy, params, tok, exs, prompts[scale], key)
            p = prefix if len(by_scale) == 1 else f"{prefix}{scale}/"
            out |= {p + k: v for k, v in report.summary().items() if v is not None}
        return out

    return evaluate


def run_sft_experiment(cfg: SFTExperiment, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) SFT; writes WORKDIR/sft (checkpoints, metrics) and WORKDIR/bundle.
    Returns {"bundle": path, "history": metrics per step, "train": examples trained on}."""
    from flax import nnx

    from jaxgrm.bundle import save_bundle
    from jaxgrm.model import create_model
    from jaxgrm.train.sft import response_encoder, run_sft

    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    train, val, source = _train_and_validation(cfg, workdir)
    if not train:
        raise ValueError("no training traces")
    tok = trace_tokenizer(
        train,
        cfg.prompt,
        cfg.vocab_size,
        cfg.tokenizer_texts,
        os.path.join(workdir, "tokenizer.model"),
    )
    mesh = auto_mesh(cfg.mesh)
    model = create_model(cfg.model.replace(vocab_size=tok.vocab_size), seed=cfg.sft.seed, mesh=mesh)

    def target_ids(ex):  # the teacher's trace, or the grade alone for the label-only format
        if cfg.prompt.format == TraceFormat.LABEL_ONLY:
            return tok.encode(render_target(ex, cfg.prompt))
        return tok.encode(ex.meta["trace"])

    encode = response_encoder(
        lambda ex: render_prompt(ex, tok, cfg.prompt).ids, target_ids, tok.eos_id
    )
    evaluate = None
    if cfg.sft.eval_every:
        evaluate = greedy_evaluator(
            model, tok, cfg.prompt, val[: cfg.eval_examples], cfg.eval_max_new_tokens,
            cfg.eval_buckets, cfg.sft.seed,
        )  # fmt: skip
    params, history = run_sft(
        model, train, encode, cfg.sft, os.path.join(workdir, "sft"), mesh=mesh, evaluate=evaluate
    )
    nnx.update(model, params)
    path = os.path.join(workdir, "bundle")
    if jax.process_index() == 0:
        scales = {ex.scale for ex in train}
        provenance = {"stage": "sft", "step": cfg.sft.steps, **source}
        scale = scales.pop() if len(scales) == 1 else None
        save_bundle(model, tok, cfg.prompt, path, scale=scale, provenance=provenance)
    return {"bundle": path, "history": history, "train": len(train), "validation": len(val)}


def acceptance_summary(stats: Mapping[str, Any]) -> str:
    """One line per grade and overall, for logs."""
    lines = [
        f"grade {g}: {s['accepted']}/{s['pairs']} accepted ({s['acceptance_rate']:.1%})"
        for g, s in stats["per_grade"].items()
    ]
    lines.append(
        f"all: {stats['accepted']}/{stats['pairs']} ({stats['acceptance_rate']:.1%}); "
        f"{len(stats['rejected'])} pairs without an accepted trace"
    )
    return "\n".join(lines)


__all__ = [
    "SFTExperiment",
    "TraceRecord",
    "acceptance_summary",
    "greedy_evaluator",
    "label_trace",
    "label_traces",
    "model_traces",
    "query_terms",
    "read_examples",
    "read_trace_meta",
    "read_trace_records",
    "read_traces",
    "run_sft_experiment",
    "world_traces",
    "write_traces",
]
