"""The distillation experiment (`jaxgrm distill`): a trained teacher bundle -> a smaller student.

Two modes (`DistillMode`):

SEQUENCE  The teacher writes one trace per training pair (`model_traces` sampling: G samples at
          `temperature`, or greedy with G = 1) and the student does ordinary SFT on them
          (`run_sft`, masked cross-entropy). A pair's label is used for rejection: the first
          trace whose grade equals the label is kept, and pairs with none are dropped and listed
          in WORKDIR/traces.jsonl.meta.json. Unlabelled pairs (`meta["unlabelled"]` true, or
          every pair when `rejection` is off) keep the teacher's first trace unconditionally,
          wrong or not; a label-only student still needs a grade to copy, so an unlabelled pair
          whose trace has no grade is dropped (counted as `ungraded`).
LOGIT     Token-level KD (`LogitDistillation`, `KDConfig`) on teacher-forced sequences: prompt +
          target, where the target is the teacher's own trace (sampled as above, `targets =
          "teacher"`) or the world teacher's trace (`targets = "world"`). Each batch gets the
          teacher's logits (or its top-k when `kd.teacher_top_k > 0`) from a jitted teacher
          forward (`jit_teacher`) before the shared train step.

label_only: the student answers with the grade alone (PromptConfig format LABEL_ONLY); its target
is the teacher's grade (SEQUENCE, or LOGIT with teacher targets) or the label (LOGIT with world
targets). LOGIT needs teacher and student to read the same tokens, so a label-only student in
LOGIT mode needs a label-only teacher (a reasoning teacher teacher-forced on a bare answer would
be off its own distribution): use SEQUENCE for a reasoning teacher -> label-only student.

The student shares the teacher's tokenizer and vocabulary (`student.vocab_size` is set from the
teacher) and the teacher's prompt settings (format aside). At the end teacher and student are
decoded greedily on the same validation pairs (`evaluate_policy`) and timed: pairs/second of
scoring the validation prompts end to end (prompt rendering done, decode + parse), at the same
batch size, after an untimed warm-up pass that compiles every shape. WORKDIR holds

    traces.jsonl (+ .meta.json)   the teacher's traces (SEQUENCE, or LOGIT with teacher targets)
    train/                        checkpoints and metrics (resumable)
    bundle/                       the student bundle
    report.json                   {"teacher": {...}, "student": {...}, "speedup", "mode", ...}

where each system has its metrics ({"accuracy", ...} per grade scale), `pairs_per_s`,
`seconds`, `pairs` and `params` (parameter count).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from jaxgrm.data.schema import RelevanceExample
from jaxgrm.data.world import WorldConfig, generate
from jaxgrm.distill import KDConfig, LogitDistillation, jit_teacher
from jaxgrm.model import ModelConfig
from jaxgrm.prompts import PromptConfig, TraceFormat, format_answer, parse_text, render_prompt
from jaxgrm.sampling import DEFAULT_BUCKETS, Sampler, SamplingConfig
from jaxgrm.train.sft import EncodeFn, SFTConfig, response_encoder, run_sft

UNLABELLED_KEY = "unlabelled"


class DistillMode(enum.StrEnum):
    SEQUENCE = "sequence"  # SFT on the teacher's sampled traces
    LOGIT = "logit"  # token-level KD on teacher-forced sequences


class LogitTargets(enum.StrEnum):
    TEACHER = "teacher"  # the teacher's own traces (sampled as in SEQUENCE mode)
    WORLD = "world"  # the world teacher's traces of the training pairs


@dataclasses.dataclass(frozen=True)
class DistillExperiment:
    """Distil the bundle at `teacher` into a `student` (module docstring).

    Data: `train` (a JSONL of examples or trace records) or else `world`'s train split, the first
    `train_pairs` of it (0: all); `validation` (a JSONL) or else the world's validation split,
    the first `eval_examples` of it. Teacher sampling (SEQUENCE, or LOGIT with teacher targets):
    `greedy` (G = 1, temperature 0) or `samples_per_pair` at `temperature`, `max_new_tokens`,
    `trace_batch_size` pairs per call, `seed`; `rejection` against the label (module docstring).
    World targets (LOGIT): `teacher_error_rate` (default the world's), `teacher_prose`,
    `teacher_seed`. `sft`: the training loop (steps, batch, optimizer, checkpoints). Evaluation:
    greedy, `eval_max_new_tokens`, `eval_batch_size` pairs per decode call, `eval_buckets`.
    """

    teacher: str = ""
    student: ModelConfig = ModelConfig.tiny()
    mode: DistillMode = DistillMode.SEQUENCE
    label_only: bool = False
    targets: LogitTargets = LogitTargets.TEACHER
    world: WorldConfig = WorldConfig.small()
    train: str | None = None
    validation: str | None = None
    train_pairs: int = 0
    kd: KDConfig = KDConfig()
    sft: SFTConfig = SFTConfig()
    greedy: bool = False
    samples_per_pair: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 96
    trace_batch_size: int = 16
    rejection: bool = True
    seed: int = 0
    teacher_error_rate: float | None = None
    teacher_prose: bool = True
    teacher_seed: int = 0
    eval_examples: int = 200
    eval_max_new_tokens: int = 96
    eval_batch_size: int = 32
    eval_buckets: tuple[int, ...] = DEFAULT_BUCKETS

    def __post_init__(self):
        object.__setattr__(self, "mode", DistillMode(self.mode))
        object.__setattr__(self, "targets", LogitTargets(self.targets))
        if self.samples_per_pair < 1 or self.trace_batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("samples_per_pair, trace_batch_size, eval_batch_size must be >= 1")


# ---- data --------------------------------------------------------------------------------------
def _splits(cfg: DistillExperiment) -> tuple[list[RelevanceExample], list[RelevanceExample]]:
    from jaxgrm.traces import read_examples  # a JSONL of examples or trace records

    world = None
    if cfg.train is None or cfg.validation is None:
        world = generate(cfg.world)
    train = read_examples(cfg.train) if cfg.train else world["train"]
    val = read_examples(cfg.validation) if cfg.validation else world["validation"]
    if cfg.train_pairs:
        train = train[: cfg.train_pairs]
    return list(train), list(val)[: cfg.eval_examples]


def _labelled(ex: RelevanceExample, cfg: DistillExperiment) -> bool:
    return cfg.rejection and not ex.meta.get(UNLABELLED_KEY, False)


def teacher_traces(bundle, examples: Sequence[RelevanceExample], cfg: DistillExperiment):
    """(records, stats): the teacher's traces of `examples`. Labelled pairs go through
    `model_traces` rejection sampling; unlabelled ones keep the first sample (module docstring).
    """
    from jaxgrm.rl.rollout import rollout
    from jaxgrm.traces import TraceRecord, model_traces

    g = 1 if cfg.greedy else cfg.samples_per_pair
    temperature = 0.0 if cfg.greedy else cfg.temperature
    labelled = [ex for ex in examples if _labelled(ex, cfg)]
    unlabelled = [ex for ex in examples if not _labelled(ex, cfg)]
    records, stats = [], {"labelled": len(labelled), "unlabelled": len(unlabelled)}
    if labelled:
        recs, rej = model_traces(
            bundle, labelled, samples_per_pair=g, temperature=temperature,
            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.trace_batch_size,
            teacher=cfg.teacher,
        )  # fmt: skip
        records += recs
        stats["rejection"] = rej
    if unlabelled:
        tok = bundle.tokenizer
        sampler = Sampler(
            bundle.model,
            SamplingConfig(
                max_new_tokens=cfg.max_new_tokens, temperature=temperature, num_samples=1,
                stop_ids=(tok.eos_id, tok.token_id("</answer>")), pad_id=tok.pad_id,
            ),
        )  # fmt: skip
        params = nnx.state(bundle.model)
        prov = {
            "teacher": cfg.teacher,
            "checkpoint_step": bundle.provenance.get("step"),
            "sampling": {"temperature": temperature, "samples_per_pair": 1, "rejection": False},
        }
        key = jax.random.fold_in(jax.random.key(cfg.seed), 1 << 20)
        for b, start in enumerate(range(0, len(unlabelled), cfg.trace_batch_size)):
            chunk = unlabelled[start : start + cfg.trace_batch_size]
            prompts = [render_prompt(ex, tok, bundle.prompt_config).ids for ex in chunk]
            r = rollout(sampler, params, tok, chunk, prompts, jax.random.fold_in(key, b))
            for j, ex in enumerate(chunk):
                ids = [t for t in r.tokens_BM[j][r.mask_BM[j]].tolist() if t != tok.pad_id]
                ids = [t for t in ids if t != tok.eos_id]
                records.append(TraceRecord(ex, tok.decode(ids), prov))
    return records, stats


def _load_or_make_traces(bundle, train, cfg: DistillExperiment, workdir: str):
    from jaxgrm.traces import read_trace_records, write_traces

    path = os.path.join(workdir, "traces.jsonl")
    if os.path.exists(path):  # resume: the traces the checkpoints were trained on
        return read_trace_records(path)
    records, stats = teacher_traces(bundle, train, cfg)
    if jax.process_index() == 0:
        write_traces(path, records, stats)
    return records


def _training_pairs(bundle, train, cfg: DistillExperiment, workdir: str) -> list[tuple]:
    """[(example, target text)] the student trains on (module docstring)."""
    from jaxgrm.traces import world_traces

    if cfg.mode == DistillMode.LOGIT and cfg.targets == LogitTargets.WORLD:
        err = cfg.teacher_error_rate
        err = cfg.world.teacher_error_rate if err is None else err
        records = world_traces(
            train, err, cfg.teacher_seed, cfg.teacher_prose, cfg.world.teacher_propagation
        )
        if cfg.label_only:
            return [(rec.example, format_answer(rec.example.label)) for rec in records]
        return [(rec.example, rec.trace) for rec in records]
    records = _load_or_make_traces(bundle, train, cfg, workdir)
    if not cfg.label_only:
        return [(rec.example, rec.trace) for rec in records]
    out = []
    for rec in records:
        grade = parse_text(rec.trace, scale=rec.example.scale).grade
        if grade is not None:  # unlabelled pairs whose trace has no grade: nothing to copy
            out.append((rec.example, format_answer(grade)))
    return out


# ---- the KD loop -------------------------------------------------------------------------------
def run_logit_kd(
    model,
    teacher_model,
    examples: Sequence[Any],
    encode: EncodeFn,
    cfg: SFTConfig,
    kd: KDConfig,
    workdir: str | os.PathLike,
) -> tuple[nnx.State, list[dict]]:
    """`run_sft` with the `LogitDistillation` objective: each batch first gets the teacher's
    logits (or top-k) from a jitted teacher forward. Returns (params, metrics history)."""
    t_graphdef, t_params = nnx.split(teacher_model)
    teacher_fn = jit_teacher(t_graphdef, kd.teacher_top_k)

    def add_teacher(batch: dict) -> dict:
        return batch | teacher_fn(t_params, batch["tokens_BT"], batch["segment_ids_BT"])

    return run_sft(
        model, examples, encode, cfg, workdir,
        objective=LogitDistillation(kd), batch_hook=add_teacher, desc="distill",
    )  # fmt: skip


# ---- evaluation and speed ----------------------------------------------------------------------
def _param_count(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def evaluate_system(model, tok, prompt: PromptConfig, val, cfg: DistillExperiment) -> dict:
    """Greedy metrics of `model` on `val` per grade scale, and its speed: pairs/second of a
    second, timed pass over the same prompts (the first pass, which compiles, is untimed)."""
    from jaxgrm.rl.rollout import evaluate_policy

    sampler = Sampler(
        model,
        SamplingConfig(
            max_new_tokens=cfg.eval_max_new_tokens, temperature=0.0, num_samples=1,
            stop_ids=(tok.eos_id, tok.token_id("</answer>")), pad_id=tok.pad_id,
            prompt_buckets=cfg.eval_buckets,
        ),
    )  # fmt: skip
    params = nnx.state(model)
    by_scale: dict[str, list[RelevanceExample]] = {}
    for ex in val:
        by_scale.setdefault(ex.scale, []).append(ex)
    prompts = {s: [render_prompt(ex, tok, prompt).ids for ex in exs] for s, exs in by_scale.items()}
    key = jax.random.key(cfg.seed)

    def one_pass():
        return {
            scale: evaluate_policy(
                sampler, params, tok, exs, prompts[scale], key, batch_size=cfg.eval_batch_size
            ).summary()
            for scale, exs in by_scale.items()
        }

    metrics = one_pass()  # warm-up: compiles every prompt bucket and batch shape
    start = time.perf_counter()
    one_pass()
    seconds = time.perf_counter() - start
    return {
        "metrics": metrics,
        "pairs": len(val),
        "seconds": seconds,
        "pairs_per_s": len(val) / seconds if seconds > 0 else None,
        "params": _param_count(model),
    }


# ---- the experiment ----------------------------------------------------------------------------
def run_distill_experiment(cfg: DistillExperiment, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) distillation; writes WORKDIR/{traces.jsonl, train, bundle, report.json}.
    Returns the report plus "bundle" (its path) and "history" (training metrics per step)."""
    from jaxgrm.bundle import load_bundle, save_bundle
    from jaxgrm.model import create_model

    if jax.process_count() > 1:
        raise NotImplementedError("jaxgrm distill runs on one process")
    if not cfg.teacher:
        raise ValueError("set `teacher` to a teacher bundle directory")
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    teacher = load_bundle(cfg.teacher)
    tok = teacher.tokenizer
    teacher_label_only = teacher.prompt_config.format == TraceFormat.LABEL_ONLY
    label_only = cfg.label_only or teacher_label_only
    if cfg.mode == DistillMode.LOGIT and label_only and not teacher_label_only:
        raise ValueError(
            "logit distillation into a label-only student needs a label-only teacher "
            "(teacher and student must read the same tokens); use mode=sequence"
        )
    cfg = dataclasses.replace(cfg, label_only=label_only)
    fmt = TraceFormat.LABEL_ONLY if label_only else teacher.prompt_config.format
    prompt = dataclasses.replace(teacher.prompt_config, format=fmt)
    train, val = _splits(cfg)
    pairs = _training_pairs(teacher, train, cfg, workdir)
    if not pairs:
        raise ValueError("no training targets (every teacher trace was rejected?)")
    student = create_model(
        cfg.student.replace(vocab_size=teacher.model.cfg.vocab_size), seed=cfg.sft.seed
    )
    encode_pair = response_encoder(
        lambda p: render_prompt(p[0], tok, prompt).ids, lambda p: tok.encode(p[1]), tok.eos_id
    )
    # The pipeline takes RelevanceExamples: each carries its target text in meta["trace"].
    examples = [dataclasses.replace(ex, meta={**ex.meta, "trace": text}) for ex, text in pairs]

    def encode(ex):
        return encode_pair((ex, ex.meta["trace"]))

    train_dir = os.path.join(workdir, "train")
    if cfg.mode == DistillMode.SEQUENCE:
        params, history = run_sft(student, examples, encode, cfg.sft, train_dir)
    else:
        params, history = run_logit_kd(
            student, teacher.model, examples, encode, cfg.sft, cfg.kd, train_dir
        )
    nnx.update(student, params)
    path = os.path.join(workdir, "bundle")
    scales = {ex.scale for ex, _ in pairs}
    provenance = {
        "stage": "distill",
        "step": cfg.sft.steps,
        "teacher": os.path.abspath(cfg.teacher),
        "mode": cfg.mode.value,
        "label_only": label_only,
    }
    scale = teacher.scale or (scales.pop() if len(scales) == 1 else None)
    save_bundle(student, tok, prompt, path, scale=scale, provenance=provenance)

    t_eval = evaluate_system(teacher.model, tok, teacher.prompt_config, val, cfg)
    s_eval = evaluate_system(student, tok, prompt, val, cfg)
    t_pps, s_pps = t_eval["pairs_per_s"], s_eval["pairs_per_s"]
    report = {
        "mode": cfg.mode.value,
        "targets": cfg.targets.value if cfg.mode == DistillMode.LOGIT else "teacher",
        "label_only": label_only,
        "train_pairs": len(pairs),
        "validation_pairs": len(val),
        "eval_batch_size": cfg.eval_batch_size,
        "device": jax.devices()[0].platform,
        "teacher": {"path": os.path.abspath(cfg.teacher), **t_eval},
        "student": {"path": os.path.abspath(path), **s_eval},
        "speedup": s_pps / t_pps if t_pps and s_pps else None,
        "final_train": history[-1] if history else None,
    }
    with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=float)
        f.write("\n")
    return {**report, "bundle": path, "history": history}


__all__ = [
    "DistillExperiment",
    "DistillMode",
    "LogitTargets",
    "evaluate_system",
    "run_distill_experiment",
    "run_logit_kd",
    "teacher_traces",
]
