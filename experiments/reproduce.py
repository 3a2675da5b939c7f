"""The paper's ablations end to end: data -> tokenizer -> SFT-Label and SFT-Reasoning ->
OutcomeRL and ProcessRL (SAM) from the same warm-up -> a distilled student of the best model ->
every system evaluated on RANDOM and LONGTAIL -> table, plots and a one-page report.

    python -m experiments.reproduce                     # synthetic world, tiny model, <= 20 min
    python -m experiments.reproduce --preset study      # 3 seeds, criteria and SAM ablations,
                                                        # data-efficiency curve (<= 2 h, 2 cores)
    python -m experiments.reproduce --data kuake_qtr    # a real set from ../shared/data
    python -m experiments.reproduce --force rl-process  # redo a stage (and what depends on it)

Outputs go to results/<run>/ (run: the preset, prefixed by the data set when not the world):
table.md, table.json, accuracy.png, curves.png, per_grade_<split>.png, data_efficiency.png
(study), report.md, and stages/<stage>/ with each stage's checkpoints, metrics and bundle.

Stages are cached: a stage whose `done.json` exists and whose dependencies and config are
unchanged is skipped; an interrupted training stage resumes from its own checkpoints.
`--force PATTERN` (a stage name, a prefix such as `rl-process`, or a glob) redoes the matching
stages; stages downstream of a redone stage rerun because their inputs changed.

Systems (method.md's ablation table): SFT-Label (grade only), SFT-Reasoning (warm-up on teacher
traces), OutcomeRL-Reasoning (GRPO, outcome reward), ProcessRL-Reasoning (GRPO + SAM), each
reasoning system also without the criteria block (study), the SAM variants (study), and a
student distilled (sequence-level KD) from the reasoning system with the best validation accuracy.

Real data (--data): teacher traces come from the label rule teacher (`jaxgrm.traces.label_trace`:
steps that the real-data verifiers can check, conditioned on the human grade); RANDOM is the
set's `test` split, LONGTAIL its `longtail` split.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxgrm.data.world import WorldConfig
from jaxgrm.model import ModelConfig
from jaxgrm.prompts import PromptConfig, TraceFormat
from jaxgrm.rl.advantages import AdvantageConfig, SamMode
from jaxgrm.rl.learner import RLConfig
from jaxgrm.train.mesh import auto_mesh
from jaxgrm.train.sft import SFTConfig
from jaxgrm.train.state import OptimConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# --data NAME -> its folder under ../shared/data
SHARED_FOLDERS = {
    "homedepot": "homedepot-search-relevance",
    "crowdflower": "crowdflower-search-relevance",
    "trec_dl": "trec-dl-judged-passages",
    "kuake_qtr": "kuake-qtr",
    "qbqtc": "qbqtc",
}
EVAL_SPLITS = ("RANDOM", "LONGTAIL")


# ---- presets -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything a run trains and evaluates. Seeds vary model initialisation, data order and
    sampling of every training stage; the data and the teacher traces are the same for all.

    sft / label_sft: the SFT-Reasoning warm-up and the SFT-Label baseline. rl: GRPO for each
    RL system (its `advantage.sam` and `prompt` are set per system). distill_*: the student's
    SFT on `distill_samples` teacher samples for each of the first `distill_pairs` training
    pairs (with `distill_rejection`, the first with the right grade is kept, else the first).
    criteria_ablation: also every reasoning system without the criteria block. sam_variants:
    extra ProcessRL runs with these SAM modes. data_sizes: the data-efficiency curve
    (SFT-Label, SFT-Reasoning and ProcessRL trained on the first n labelled pairs; evaluated on
    RANDOM). eval_examples: pairs per
    evaluation split; val_examples: validation pairs (learning curves, choice of the teacher).
    real_train_pairs: training pairs drawn from a real set (--data); real_vocab_size and
    real_character_coverage: its tokenizer (Chinese sets have thousands of characters; those
    outside the coverage become bytes).
    """

    world: WorldConfig
    model: ModelConfig
    student: ModelConfig
    sft: SFTConfig
    label_sft: SFTConfig
    rl: RLConfig
    distill_sft: SFTConfig
    distill_pairs: int = 600
    distill_samples: int = 2
    distill_rejection: bool = True
    vocab_size: int = 1024
    tokenizer_texts: int = 3000
    prompt: PromptConfig = PromptConfig(instructions=False, doc_budget=64)
    seeds: tuple[int, ...] = (0,)
    criteria_ablation: bool = False
    sam_variants: tuple[SamMode, ...] = ()
    data_sizes: tuple[int, ...] = ()
    eval_examples: int = 300
    val_examples: int = 200
    eval_max_new_tokens: int = 80
    eval_buckets: tuple[int, ...] = (320, 384, 448)
    eval_batch_size: int = 64
    real_train_pairs: int = 3000
    real_vocab_size: int = 4096
    real_character_coverage: float = 0.995
    teacher_seed: int = 0


def _sft(steps: int, batch: int = 8, max_len: int = 448, lr: float = 2e-3, eval_every: int = 0):
    # One example per row (prompts <= ~370 tokens, traces <= ~70): pad mode, no packing.
    return SFTConfig(
        steps=steps,
        batch_size=batch,
        max_len=max_len,
        pack=False,
        optim=OptimConfig(learning_rate=lr, warmup_steps=min(20, steps // 5), total_steps=steps),
        save_every=100,
        eval_every=eval_every,
    )


def _rl(steps: int, prompts: int = 8, group: int = 8, eval_every: int = 10, val: int = 200):
    return RLConfig(
        steps=steps,
        prompts_per_step=prompts,
        group_size=group,
        max_new_tokens=80,
        temperature=1.0,
        num_passes=1,
        minibatches=2,
        advantage=AdvantageConfig(mode="std"),
        optim=OptimConfig(learning_rate=2e-4, warmup_steps=0, total_steps=steps),
        prompt_buckets=(320, 384, 448),
        eval_every=eval_every,
        eval_examples=val,
        save_every=10,
        sample_every=10,
    )


_TINY = ModelConfig.tiny(max_seq_len=1024)
_STUDENT = ModelConfig.tiny(
    d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, mlp_dim=192, max_seq_len=1024,
    name="student",
)  # fmt: skip


def preset_default() -> Preset:
    """One seed of every core system, sized for <= 20 minutes on a 2-core CPU."""
    return Preset(
        world=WorldConfig.small(),
        model=_TINY,
        student=_STUDENT,
        sft=_sft(400, eval_every=100),
        label_sft=_sft(300, eval_every=100),
        rl=_rl(20, eval_every=10),
        distill_sft=_sft(200),
        distill_pairs=400,
        distill_samples=2,
        eval_examples=300,
        val_examples=200,
    )


def preset_study() -> Preset:
    """The CPU study (<= 2 h on 2 cores; sized for about 90 minutes): 3 seeds; the criteria
    ablation; the SAM variants; a data-efficiency point at 300 labelled pairs besides the full
    3,000. Traded for time: the tiny model, 250 SFT steps (batch 8), 10 RL steps of 8 prompts x
    8 samples, 200 pairs per evaluation split, validation only at the end of SFT."""
    return Preset(
        world=WorldConfig.small(),
        model=_TINY,
        student=_STUDENT,
        sft=_sft(250),
        label_sft=_sft(150),
        rl=_rl(10, eval_every=10, val=150),
        distill_sft=_sft(100),
        distill_pairs=200,
        distill_samples=2,
        seeds=(0, 1, 2),
        criteria_ablation=True,
        sam_variants=(SamMode.POSITIVE_ONLY, SamMode.NEGATIVE_ONLY, SamMode.BONUS),
        data_sizes=(300,),
        eval_examples=200,
        val_examples=150,
    )


def preset_smoke() -> Preset:
    """A handful of steps of every stage (CI): checks the plumbing, not the numbers."""
    world = WorldConfig(
        seed=0, train_size=120, validation_size=24, random_size=24, longtail_size=24
    )  # fmt: skip
    model = ModelConfig.tiny(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                             mlp_dim=64, max_seq_len=1024)  # fmt: skip
    rl = dataclasses.replace(
        _rl(2, prompts=2, group=2, eval_every=2, val=8), max_new_tokens=24, minibatches=1
    )
    return Preset(
        world=world,
        model=model,
        student=model.replace(name="student"),
        sft=_sft(3, batch=4, eval_every=3),
        label_sft=_sft(2, batch=4),
        rl=rl,
        distill_sft=_sft(2, batch=4),
        distill_pairs=6,
        distill_samples=1,
        distill_rejection=False,  # an untrained teacher is rarely right
        vocab_size=400,
        tokenizer_texts=120,
        criteria_ablation=True,
        sam_variants=(SamMode.POSITIVE_ONLY,),
        data_sizes=(30,),
        eval_examples=8,
        val_examples=8,
        eval_max_new_tokens=24,
        real_train_pairs=120,
        real_vocab_size=1024,
        real_character_coverage=0.98,
    )


PRESETS: dict[str, Callable[[], Preset]] = {
    "default": preset_default,
    "study": preset_study,
    "smoke": preset_smoke,
}


# ---- stages ------------------------------------------------------------------------------------
class Stages:
    """Runs named stages once: `done.json` in a stage's directory records its result, a stamp
    and its dependencies' stamps; a stage reruns when forced or when a dependency's stamp
    changed. A stage interrupted with unchanged dependencies keeps its directory (resume)."""

    def __init__(self, root: str | os.PathLike, force: Sequence[str] = (), log=print):
        self.root = Path(root)
        self.force = tuple(force)
        self.log = log
        self.stamps: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.ran: list[str] = []
        self.cached: list[str] = []
        self.seen: list[str] = []

    def dir(self, name: str) -> Path:
        return self.root / "stages" / name

    @staticmethod
    def forced_by(name: str, pattern: str) -> bool:
        return (
            name == pattern or name.startswith(pattern + "-") or fnmatch.fnmatchcase(name, pattern)
        )

    def forced(self, name: str) -> bool:
        return any(self.forced_by(name, p) for p in self.force)

    def run(self, name: str, deps: Sequence[str], fn: Callable[[Path], Any], config=None) -> Any:
        """Run stage `name` (or take its cached result); `config`: what the stage's output
        depends on besides `deps` (its repr is hashed: a change reruns the stage)."""
        d = self.dir(name)
        done, started = d / "done.json", d / "started.json"
        dep_stamps = {k: self.stamps[k] for k in deps}
        self.seen.append(name)
        dep_stamps["config"] = hashlib.sha256(repr(config).encode()).hexdigest()[:16]
        forced = self.forced(name)
        if done.exists() and not forced:
            rec = json.loads(done.read_text())
            if rec["deps"] == dep_stamps:
                self.stamps[name], self.results[name] = rec["stamp"], rec["result"]
                self.seconds[name] = rec["seconds"]
                self.cached.append(name)
                return rec["result"]
        resume = (
            not forced
            and not done.exists()
            and started.exists()
            and json.loads(started.read_text())["deps"] == dep_stamps
        )
        if d.exists() and not resume:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps({"deps": dep_stamps}))
        self.log(f"[reproduce] stage {name}" + (" (resuming)" if resume else ""))
        t0 = time.perf_counter()
        result = fn(d)
        seconds = time.perf_counter() - t0
        rec = {
            "stamp": uuid.uuid4().hex,
            "deps": dep_stamps,
            "result": result,
            "seconds": seconds,
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        tmp = d / "done.json.tmp"
        tmp.write_text(json.dumps(rec, indent=1, default=float))
        os.replace(tmp, done)
        self.stamps[name], self.results[name], self.seconds[name] = rec["stamp"], result, seconds
        self.ran.append(name)
        self.log(f"[reproduce] stage {name} done in {seconds:.0f} s")
        return result


# ---- data --------------------------------------------------------------------------------------
def load_data(data: str | None, preset: Preset, data_dir: Path, shared: Path) -> dict[str, list]:
    """{"train", "validation", "RANDOM", "LONGTAIL"}: lists of RelevanceExample."""
    if data is None:
        from jaxgrm.data.world import generate

        splits = generate(preset.world)
        return {
            "train": splits["train"],
            "validation": splits["validation"],
            "RANDOM": splits["random"],
            "LONGTAIL": splits["longtail"],
        }
    import tensorflow_datasets as tfds

    from jaxgrm.data.builders import build
    from jaxgrm.data.schema import from_tfds_record

    if data not in SHARED_FOLDERS:
        raise SystemExit(f"--data {data}: expected one of {', '.join(SHARED_FOLDERS)}")
    manual = shared / SHARED_FOLDERS[data]
    if not manual.is_dir():
        raise SystemExit(f"--data {data}: {manual} is not a folder (see ../shared/data/README.md)")
    builder = build(data, manual_dir=manual, data_dir=data_dir, on_bad_row="skip")
    out = {}
    for split, name in (
        ("train", "train"), ("validation", "validation"), ("test", "RANDOM"),
        ("longtail", "LONGTAIL"),
    ):  # fmt: skip
        source = tfds.data_source(builder.name, data_dir=str(data_dir), split=split)
        out[name] = [from_tfds_record(source[i]) for i in range(len(source))]
    # A fixed shuffle before the cap, so the first n pairs are a sample of the whole set.
    rng = random.Random(f"reproduce/{data}")
    for name, cap in (("train", preset.real_train_pairs), ("validation", None)):
        rng.shuffle(out[name])
        if cap:
            out[name] = out[name][:cap]
    return out


def _grades(examples) -> dict[str, int]:
    out: dict[str, int] = {}
    for ex in examples:
        out[str(ex.label)] = out.get(str(ex.label), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _write_jsonl(path: Path, examples) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(ex.to_json() + "\n")


# ---- the pipeline ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class System:
    """A row of the table: `stage` trains it; `label` is its name in the table."""

    key: str
    label: str
    stage: str
    group: str  # "main", "criteria", "sam", "student", "efficiency"
    seed: int
    pairs: int | None = None  # training pairs (data-efficiency systems)


class Pipeline:
    def __init__(self, preset: Preset, root: Path, data: str | None, force=(), data_dir=None,
                 shared: Path = SHARED_DATA):  # fmt: skip
        self.preset, self.root, self.data = preset, Path(root), data
        self.stages = Stages(self.root, force)
        self.data_dir = Path(data_dir) if data_dir else self.root / "data"
        self.shared = Path(shared)
        self.systems: list[System] = []
        self._splits: dict[str, list] | None = None
        self._tok = None

    # -- shared inputs ---------------------------------------------------------------------------
    @property
    def splits(self) -> dict[str, list]:
        if self._splits is None:
            self._splits = load_data(self.data, self.preset, self.data_dir, self.shared)
        return self._splits

    @property
    def tok(self):
        if self._tok is None:
            from jaxgrm.tokenizer import load_tokenizer

            self._tok = load_tokenizer(str(self.stages.dir("tokenizer") / "tokenizer.model"))
        return self._tok

    def traced(self) -> list:
        """Training examples with the teacher's trace in meta["trace"]."""
        from jaxgrm.traces import label_traces, world_traces

        train = self.splits["train"]
        if self.data is None:
            w = self.preset.world
            records = world_traces(
                train, w.teacher_error_rate, self.preset.teacher_seed, prose=False,
                propagation=w.teacher_propagation,
            )  # fmt: skip
        else:
            records = label_traces(train)
        return [r.to_example() for r in records]

    def prompt(self, fmt: TraceFormat = TraceFormat.REASONING, criteria: bool = True):
        return dataclasses.replace(self.preset.prompt, format=fmt, criteria=criteria)

    def scale(self) -> str | None:
        scales = {ex.scale for ex in self.splits["train"]}
        return scales.pop() if len(scales) == 1 else None

    # -- stage bodies ----------------------------------------------------------------------------
    def stage_data(self, d: Path) -> dict:
        splits = self.splits
        _write_jsonl(d / "train.jsonl", splits["train"])
        _write_jsonl(d / "validation.jsonl", splits["validation"][: self.preset.val_examples])
        return {
            "source": self.data or "world",
            "splits": {
                name: {"pairs": len(exs), "queries": len({e.qid for e in exs}),
                       "grades": _grades(exs)}
                for name, exs in splits.items()
            },
        }  # fmt: skip

    def stage_tokenizer(self, d: Path) -> dict:
        from jaxgrm.traces import trace_tokenizer

        p, real = self.preset, self.data is not None
        tok = trace_tokenizer(
            self.traced(), self.prompt(), p.real_vocab_size if real else p.vocab_size,
            p.tokenizer_texts, str(d / "tokenizer.model"),
            p.real_character_coverage if real else 0.9995,
        )  # fmt: skip
        return {"vocab_size": tok.vocab_size}

    def _validator(self, model, prompt):
        from jaxgrm.traces import greedy_evaluator

        p = self.preset
        return greedy_evaluator(
            model, self.tok, prompt, self.splits["validation"][: p.val_examples],
            p.eval_max_new_tokens, p.eval_buckets,
        )  # fmt: skip

    def _save(self, model, prompt, d: Path, provenance: dict) -> str:
        from jaxgrm.bundle import save_bundle

        path = d / "bundle"
        save_bundle(model, self.tok, prompt, path, scale=self.scale(), provenance=provenance)
        return str(path)

    def stage_sft(self, d: Path, fmt: TraceFormat, criteria: bool, seed: int, pairs=None):
        from flax import nnx

        from jaxgrm.model import create_model
        from jaxgrm.prompts import render_prompt, render_target
        from jaxgrm.train.metrics import read_metrics
        from jaxgrm.train.sft import response_encoder, run_sft

        tok, prompt = self.tok, self.prompt(fmt, criteria)
        cfg = self.preset.sft if fmt == TraceFormat.REASONING else self.preset.label_sft
        cfg = dataclasses.replace(cfg, seed=seed)
        train = self.traced()[:pairs] if pairs else self.traced()
        mesh = auto_mesh()
        model_cfg = self.preset.model.replace(vocab_size=tok.vocab_size)
        model = create_model(model_cfg, seed=seed, mesh=mesh)

        def target(ex):
            if fmt == TraceFormat.LABEL_ONLY:
                return tok.encode(render_target(ex, prompt))
            return tok.encode(ex.meta["trace"])

        encode = response_encoder(lambda ex: render_prompt(ex, tok, prompt).ids, target, tok.eos_id)
        validate = self._validator(model, prompt)
        params, _ = run_sft(model, train, encode, cfg, d, mesh=mesh, evaluate=validate, desc=d.name)
        nnx.update(model, params)
        val = validate(params, cfg.steps) if validate else {}
        bundle = self._save(model, prompt, d, {"stage": d.name, "step": cfg.steps})
        curve = [
            {k: v for k, v in h.items() if k == "step" or k.startswith("val/")}
            for h in read_metrics(str(d)) if "val/accuracy" in h
        ]  # fmt: skip
        return {"bundle": bundle, "val": val, "curve": curve, "train_pairs": len(train)}

    def stage_rl(self, d: Path, warmup: str, sam: SamMode, criteria: bool, seed: int, pairs=None):
        import jax
        from flax import nnx

        from jaxgrm.bundle import load_bundle
        from jaxgrm.rl.learner import Learner
        from jaxgrm.train.metrics import read_metrics

        prompt = self.prompt(TraceFormat.REASONING, criteria)
        mesh = auto_mesh()
        start = load_bundle(self.stages.results[warmup]["bundle"], mesh=mesh)
        model = start.model
        rl = self.preset.rl
        cfg = dataclasses.replace(
            rl, seed=seed, prompt=prompt, advantage=dataclasses.replace(rl.advantage, sam=sam)
        )
        train = self.splits["train"][:pairs] if pairs else self.splits["train"]
        val = self.splits["validation"][: self.preset.val_examples]
        learner = Learner(model, self.tok, train, val, cfg, d, mesh=mesh)
        learner.run()
        nnx.update(model, learner.state.params)
        history = read_metrics(str(d))
        last_val = next((h for h in reversed(history) if "val/accuracy" in h), {})
        curve = [
            {k: v for k, v in h.items() if k == "step" or k.startswith("val/") or k in _RL_KEYS}
            for h in history
        ]  # fmt: skip
        bundle = self._save(model, prompt, d, {"stage": d.name, "step": cfg.steps})
        jax.clear_caches()
        return {
            "bundle": bundle,
            "val": {k: v for k, v in last_val.items() if k.startswith("val/")},
            "curve": curve,
            "train_pairs": len(train),
        }

    def stage_distill(self, d: Path, candidates: Sequence[str], seed: int) -> dict:
        from jaxgrm.distill_run import DistillExperiment, DistillMode, run_distill_experiment

        p = self.preset
        vals = {c: self.stages.results[c]["val"].get("val/accuracy", -1.0) for c in candidates}
        best = max(candidates, key=lambda c: vals[c])  # ties: the first listed
        data = self.stages.dir("data")
        cfg = DistillExperiment(
            teacher=self.stages.results[best]["bundle"],
            student=p.student,
            mode=DistillMode.SEQUENCE,
            train=str(data / "train.jsonl"),
            validation=str(data / "validation.jsonl"),
            train_pairs=p.distill_pairs,
            sft=dataclasses.replace(p.distill_sft, seed=seed),
            samples_per_pair=p.distill_samples,
            rejection=p.distill_rejection,
            max_new_tokens=p.eval_max_new_tokens,
            seed=seed,
            eval_examples=p.val_examples,
            eval_max_new_tokens=p.eval_max_new_tokens,
            eval_batch_size=p.eval_batch_size,
            eval_buckets=p.eval_buckets,
        )
        report = run_distill_experiment(cfg, d)
        return {
            "bundle": report["bundle"],
            "teacher_stage": best,
            "candidates_val_accuracy": vals,
            "train_pairs": report["train_pairs"],
            "teacher_pairs_per_s": report["teacher"]["pairs_per_s"],
            "student_pairs_per_s": report["student"]["pairs_per_s"],
            "speedup": report["speedup"],
            "teacher_params": report["teacher"]["params"],
            "student_params": report["student"]["params"],
            "val": {},
        }

    def stage_eval(self, d: Path, train_stage: str, splits: Sequence[str]) -> dict:
        import jax

        from jaxgrm.bundle import load_bundle
        from jaxgrm.rl.rollout import evaluate_policy
        from jaxgrm.sampling import Sampler, SamplingConfig

        p = self.preset
        bundle = load_bundle(self.stages.results[train_stage]["bundle"])
        tok = bundle.tokenizer
        sampler = Sampler(
            bundle.model,
            SamplingConfig(
                max_new_tokens=p.eval_max_new_tokens, temperature=0.0, num_samples=1,
                stop_ids=(tok.eos_id, tok.token_id("</answer>")), pad_id=tok.pad_id,
                prompt_buckets=p.eval_buckets,
            ),
        )  # fmt: skip
        from flax import nnx

        from jaxgrm.prompts import render_prompt

        params = nnx.state(bundle.model)
        out = {}
        for split in splits:
            exs = self.splits[split][: p.eval_examples]
            prompts = [render_prompt(ex, tok, bundle.prompt_config).ids for ex in exs]
            t0 = time.perf_counter()
            report = evaluate_policy(
                sampler, params, tok, exs, prompts, jax.random.key(0), batch_size=p.eval_batch_size
            )
            report.meta.update(system=d.name, split=split, seconds=time.perf_counter() - t0)
            report.to_json(d / f"{split}.json")
            out[split] = {"report": str(d / f"{split}.json"), **report.summary()}
        jax.clear_caches()
        return out

    # -- the graph -------------------------------------------------------------------------------
    def build(self) -> None:
        """Declare and run every stage (in dependency order)."""
        p, st = self.preset, self.stages
        data_cfg = (self.data, p.world if self.data is None else p.real_train_pairs, p.val_examples)
        st.run("data", [], self.stage_data, data_cfg)
        tok_cfg = (p.vocab_size, p.tokenizer_texts, p.prompt, p.teacher_seed)
        if self.data is not None:
            tok_cfg = (p.real_vocab_size, p.real_character_coverage, p.tokenizer_texts, p.prompt)
        st.run("tokenizer", ["data"], self.stage_tokenizer, tok_cfg)
        R, L = TraceFormat.REASONING, TraceFormat.LABEL_ONLY
        sft_cfg = (p.model, p.sft, p.prompt, p.val_examples, p.teacher_seed)
        label_cfg = (p.model, p.label_sft, p.prompt, p.val_examples)
        rl_cfg = (p.rl, p.prompt, p.val_examples)
        crit = (True, False) if p.criteria_ablation else (True,)
        for seed in p.seeds:
            s = f"s{seed}"
            self._train(f"sft-label-{s}", ["tokenizer"], "SFT-Label", "main", seed, label_cfg,
                        lambda d, seed=seed: self.stage_sft(d, L, True, seed))  # fmt: skip
            candidates = []
            for c in crit:
                nc = "" if c else "-nocrit"
                label_nc = "" if c else " (no criteria)"
                group = "main" if c else "criteria"
                warm = f"sft-reasoning{nc}-{s}"
                self._train(warm, ["tokenizer"], f"SFT-Reasoning{label_nc}", group, seed, sft_cfg,
                            lambda d, seed=seed, c=c: self.stage_sft(d, R, c, seed))  # fmt: skip
                for name, label, sam in (
                    ("outcome", "OutcomeRL-Reasoning", SamMode.OFF),
                    ("process", "ProcessRL-Reasoning", SamMode.BOTH),
                ):
                    stage = f"rl-{name}{nc}-{s}"
                    self._train(stage, [warm], f"{label}{label_nc}", group, seed, rl_cfg,
                                lambda d, w=warm, m=sam, seed=seed, c=c:
                                self.stage_rl(d, w, m, c, seed))  # fmt: skip
                    if c:
                        candidates.append(stage)
                if c:
                    candidates.append(warm)
            for sam in p.sam_variants:
                stage = f"rl-process-{sam.value}-{s}"
                warm = f"sft-reasoning-{s}"
                self._train(stage, [warm], f"ProcessRL (SAM {sam.value})", "sam", seed, rl_cfg,
                            lambda d, m=sam, w=warm, seed=seed:
                            self.stage_rl(d, w, m, True, seed))  # fmt: skip
            distill_cfg = (p.student, p.distill_sft, p.distill_pairs, p.distill_samples,
                           p.distill_rejection, p.val_examples)  # fmt: skip
            self._train(f"distill-{s}", candidates, "Student (distilled)", "student", seed,
                        distill_cfg, lambda d, c=tuple(candidates), seed=seed:
                        self.stage_distill(d, c, seed))  # fmt: skip
            for n in p.data_sizes:
                warm = f"eff-sft-reasoning-n{n}-{s}"
                kw = {"pairs": n, "splits": ("RANDOM",)}
                self._train(f"eff-sft-label-n{n}-{s}", ["tokenizer"], "SFT-Label", "efficiency",
                            seed, label_cfg, lambda d, n=n, seed=seed:
                            self.stage_sft(d, L, True, seed, n), **kw)  # fmt: skip
                self._train(warm, ["tokenizer"], "SFT-Reasoning", "efficiency", seed, sft_cfg,
                            lambda d, n=n, seed=seed: self.stage_sft(d, R, True, seed, n),
                            **kw)  # fmt: skip
                self._train(f"eff-rl-process-n{n}-{s}", [warm], "ProcessRL-Reasoning",
                            "efficiency", seed, rl_cfg, lambda d, n=n, w=warm, seed=seed:
                            self.stage_rl(d, w, SamMode.BOTH, True, seed, n), **kw)  # fmt: skip
        unmatched = [f for f in st.force if not any(st.forced_by(n, f) for n in st.seen)]
        if unmatched:
            print(f"[reproduce] warning: --force {', '.join(unmatched)} matched no stage")

    def _train(self, stage, deps, label, group, seed, config, fn, pairs=None, splits=EVAL_SPLITS):
        self.stages.run(stage, deps, fn, config)
        p = self.preset
        eval_cfg = (splits, p.eval_examples, p.eval_max_new_tokens, p.eval_buckets,
                    p.eval_batch_size)  # fmt: skip
        self.stages.run(f"eval-{stage}", [stage], lambda d: self.stage_eval(d, stage, splits),
                        eval_cfg)  # fmt: skip
        self.systems.append(System(stage, label, stage, group, seed, pairs))


_RL_KEYS = ("reward_mean", "step_accuracy", "all_steps_right", "sam_masked_fraction", "loss")


# ---- aggregation -------------------------------------------------------------------------------
METRICS = (
    ("accuracy", "acc.", True),
    ("macro_f1", "macro-F1", False),
    ("mean_abs_error", "MAE", False),
    ("ndcg", "NDCG@10", False),
    ("step_accuracy", "step acc.", True),
    ("all_steps_right", "all steps right", True),
)


def mean_ci(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and the half-width of its 95% t-interval (None for one value)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(vals) / n
    if n == 1:
        return {"mean": mean, "ci95": None, "n": 1}
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return {"mean": mean, "ci95": float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n), "n": n}


def aggregate(systems: Sequence[System], results: dict[str, Any]) -> dict[str, Any]:
    """table.json: per system label and group, per split and metric, mean / ci95 / n and the
    per-seed values."""
    rows: dict[tuple[str, str, int | None], dict] = {}
    for sys_ in systems:
        row = rows.setdefault(
            (sys_.group, sys_.label, sys_.pairs),
            {"system": sys_.label, "group": sys_.group, "pairs": sys_.pairs, "stages": [],
             "splits": {}},
        )  # fmt: skip
        row["stages"].append(sys_.stage)
        for split, summary in results[f"eval-{sys_.stage}"].items():
            per = row["splits"].setdefault(split, {})
            for key, _, _ in METRICS:
                per.setdefault(key, {"values": {}})["values"][str(sys_.seed)] = summary.get(key)
    for row in rows.values():
        for per in row["splits"].values():
            for cell in per.values():
                cell.update(mean_ci(list(cell["values"].values())))
    return {"rows": list(rows.values())}


def _fmt(cell: dict, pct: bool) -> str:
    if cell.get("mean") is None:
        return "-"
    scale = 100 if pct else 1
    digits = 1 if pct else 3
    text = f"{cell['mean'] * scale:.{digits}f}"
    if cell.get("ci95") is not None:
        text += f" ± {cell['ci95'] * scale:.{digits}f}"
    return text


def table_markdown(table: dict, seeds: int) -> str:
    lines = []
    for split in EVAL_SPLITS:
        rows = [r for r in table["rows"] if split in r["splits"] and r["group"] != "efficiency"]
        if not rows:
            continue
        lines += [f"### {split}", ""]
        head = ["system", *(m[1] for m in METRICS)]
        lines += ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(METRICS) + "|"]
        for r in rows:
            cells = [_fmt(r["splits"][split][k], pct) for k, _, pct in METRICS]
            lines.append(f"| {r['system']} | " + " | ".join(cells) + " |")
        lines.append("")
    eff = [r for r in table["rows"] if r["group"] == "efficiency"]
    if eff:
        lines += ["### Data efficiency (RANDOM accuracy, %)", ""]
        lines += ["| system | pairs | acc. | step acc. |", "|---|---:|---:|---:|"]
        for r in sorted(eff, key=lambda r: (r["system"], r["pairs"])):
            cell = r["splits"]["RANDOM"]
            lines.append(
                f"| {r['system']} | {r['pairs']} | {_fmt(cell['accuracy'], True)} | "
                f"{_fmt(cell['step_accuracy'], True)} |"
            )
        lines.append("")
    note = (
        f"Mean over {seeds} seeds ± the half-width of the 95% t-interval; percentages except "
        "macro-F1, MAE (grades) and NDCG@10 (ranking by the greedy grade)."
        if seeds > 1
        else "One seed (no interval); percentages except macro-F1, MAE and NDCG@10."
    )
    return "\n".join([*lines, note, ""])


def paired_difference(table: dict, a: str, b: str, split: str, key: str = "accuracy") -> dict:
    """Mean and 95% interval of (a - b) over the seeds both systems ran (None if missing)."""
    rows = {r["system"]: r for r in table["rows"] if r["group"] != "efficiency"}
    if a not in rows or b not in rows or split not in rows[a]["splits"]:
        return {"mean": None, "ci95": None, "n": 0}
    va = rows[a]["splits"][split][key]["values"]
    vb = rows[b]["splits"][split][key]["values"]
    diffs = [va[s] - vb[s] for s in va if s in vb and va[s] is not None and vb[s] is not None]
    return mean_ci(diffs)


def verdict(diff: dict) -> str:
    if diff["mean"] is None:
        return "not measured"
    if diff["ci95"] is None:
        return "higher (one seed, no interval)" if diff["mean"] > 0 else "not higher (one seed)"
    lo, hi = diff["mean"] - diff["ci95"], diff["mean"] + diff["ci95"]
    if lo > 0:
        return "holds (interval above 0)"
    if hi < 0:
        return "reversed (interval below 0)"
    return "not established (interval contains 0)"


def claims(table: dict) -> list[dict]:
    """The paper's claims as paired accuracy differences per split."""
    pairs = [
        ("ProcessRL > OutcomeRL", "ProcessRL-Reasoning", "OutcomeRL-Reasoning"),
        ("OutcomeRL > SFT-Reasoning", "OutcomeRL-Reasoning", "SFT-Reasoning"),
        ("ProcessRL > SFT-Reasoning", "ProcessRL-Reasoning", "SFT-Reasoning"),
        ("SFT-Reasoning > SFT-Label", "SFT-Reasoning", "SFT-Label"),
        ("criteria help SFT-Reasoning", "SFT-Reasoning", "SFT-Reasoning (no criteria)"),
        ("criteria help ProcessRL", "ProcessRL-Reasoning", "ProcessRL-Reasoning (no criteria)"),
        ("student stays close: student - teacher", "Student (distilled)", None),
    ]
    out = []
    for name, a, b in pairs:
        for split in EVAL_SPLITS:
            if b is None:
                diff = student_gap(table, split)
                text = "not measured" if diff["mean"] is None else (
                    f"gap {diff['mean'] * 100:+.1f} points"
                    + (f" ± {diff['ci95'] * 100:.1f}" if diff["ci95"] is not None else "")
                )  # fmt: skip
                out.append({"claim": name, "split": split, **diff, "verdict": text})
                continue
            diff = paired_difference(table, a, b, split)
            if diff["mean"] is None:
                continue
            out.append({"claim": name, "split": split, **diff, "verdict": verdict(diff)})
    # Data efficiency: with n labelled pairs, RL on top of the warm-up against SFT alone.
    eff = {(r["system"], r["pairs"]): r for r in table["rows"] if r["group"] == "efficiency"}
    for n in sorted({p for _, p in eff}):
        for other in ("SFT-Reasoning", "SFT-Label"):
            a, b = eff.get(("ProcessRL-Reasoning", n)), eff.get((other, n))
            if a is None or b is None:
                continue
            va = a["splits"]["RANDOM"]["accuracy"]["values"]
            vb = b["splits"]["RANDOM"]["accuracy"]["values"]
            diff = mean_ci([va[s] - vb[s] for s in va if s in vb and None not in (va[s], vb[s])])
            name = f"data-efficient: ProcessRL > {other}, {n} pairs"
            out.append({"claim": name, "split": "RANDOM", **diff, "verdict": verdict(diff)})
    return out


def student_gap(table: dict, split: str) -> dict:
    """Student minus its own teacher, per seed (the teacher differs by seed)."""
    rows = {r["system"]: r for r in table["rows"] if r["group"] != "efficiency"}
    student = rows.get("Student (distilled)")
    if student is None or split not in student["splits"]:
        return {"mean": None, "ci95": None, "n": 0}
    teachers = table.get("teachers", {})
    by_stage = {s: r for r in table["rows"] for s in r["stages"]}
    diffs = []
    for seed, value in student["splits"][split]["accuracy"]["values"].items():
        t_stage = teachers.get(seed)
        if t_stage is None or value is None:
            continue
        t_val = by_stage[t_stage]["splits"][split]["accuracy"]["values"].get(seed)
        if t_val is not None:
            diffs.append(value - t_val)
    return mean_ci(diffs)


# ---- plots -------------------------------------------------------------------------------------
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(table: dict, path: Path) -> None:
    rows = [r for r in table["rows"] if r["group"] != "efficiency"]
    fig = _figure(max(6, 0.9 * len(rows) + 2), 3.8)
    ax = fig.subplots()
    width = 0.38
    for i, split in enumerate(EVAL_SPLITS):
        means = [r["splits"].get(split, {}).get("accuracy", {}).get("mean") or 0 for r in rows]
        errs = [r["splits"].get(split, {}).get("accuracy", {}).get("ci95") or 0 for r in rows]
        xs = [j + (i - 0.5) * width for j in range(len(rows))]
        ax.bar(xs, [m * 100 for m in means], width, yerr=[e * 100 for e in errs], label=split,
               capsize=3)  # fmt: skip
    ax.set_xticks(range(len(rows)), [r["system"] for r in rows], rotation=30, ha="right",
                  fontsize=8)  # fmt: skip
    ax.set_ylabel("grade accuracy (%)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)


def plot_curves(systems: Sequence[System], results: dict, path: Path) -> None:
    """Validation accuracy and all-steps-right over training, SFT and RL stages (first seed)."""
    seed = min(s.seed for s in systems)
    panels = (("val/accuracy", "validation grade accuracy"),
              ("val/all_steps_right", "validation all-steps-right"))  # fmt: skip
    fig = _figure(11, 3.6)
    axes = fig.subplots(1, 3)
    for sys_ in systems:
        if sys_.seed != seed or sys_.group == "efficiency":
            continue
        curve = results[sys_.stage].get("curve") or []
        is_rl = sys_.stage.startswith("rl-")
        targets = zip(axes[1:], panels, strict=True) if is_rl else [(axes[0], panels[0])]
        for ax, (key, title) in targets:
            pts = [(h["step"], h[key]) for h in curve if h.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=sys_.label)
                ax.set_title(("SFT: " if not is_rl else "RL: ") + title, fontsize=9)
    axes[0].set_xlabel("SFT step")
    for ax in axes[1:]:
        ax.set_xlabel("RL step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def plot_efficiency(table: dict, path: Path) -> bool:
    eff = [r for r in table["rows"] if r["group"] == "efficiency"]
    if not eff:
        return False
    fig = _figure(5.5, 3.8)
    ax = fig.subplots()
    full = {r["system"]: r for r in table["rows"] if r["group"] == "main"}
    for name in sorted({r["system"] for r in eff}):
        pts = sorted((r["pairs"], r["splits"]["RANDOM"]["accuracy"]) for r in eff
                     if r["system"] == name)  # fmt: skip
        if name in full and "RANDOM" in full[name]["splits"]:
            pts.append(
                (full[name].get("train_pairs") or 0, full[name]["splits"]["RANDOM"]["accuracy"])
            )
        pts = [(n, c) for n, c in pts if n and c.get("mean") is not None]
        ax.errorbar([n for n, _ in pts], [c["mean"] * 100 for _, c in pts],
                    yerr=[(c["ci95"] or 0) * 100 for _, c in pts], marker="o", capsize=3,
                    label=name)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("labelled training pairs")
    ax.set_ylabel("RANDOM grade accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def plot_per_grade(systems: Sequence[System], root: Path, split: str, path: Path) -> None:
    from jaxgrm.evaluate import Report, plot_per_grade_f1

    seed = min(s.seed for s in systems)
    reports = {}
    for s in systems:
        f = root / "stages" / f"eval-{s.stage}" / f"{split}.json"
        if s.seed == seed and s.group in ("main", "student") and f.exists():
            reports[s.label] = Report.from_json(f)
    if reports:
        plot_per_grade_f1(reports, path)


# ---- the report --------------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               text=True, capture_output=True).stdout.strip()  # fmt: skip
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on {jax.devices()[0].platform}"


def write_outputs(pipe: Pipeline, argv: Sequence[str], wall: float) -> dict:
    root, st = pipe.root, pipe.stages
    table = aggregate(pipe.systems, st.results)
    table["teachers"] = {
        str(s.seed): st.results[s.stage]["teacher_stage"]
        for s in pipe.systems
        if s.group == "student"
    }
    for r in table["rows"]:
        r["train_pairs"] = st.results[r["stages"][0]].get("train_pairs")
    found = claims(table)
    meta = {
        "command": "python -m experiments.reproduce " + " ".join(argv),
        "commit": _git_commit(),
        "hardware": hardware(),
        "wall_seconds_this_invocation": wall,
        "stage_seconds": st.seconds,
        "stages_run": st.ran,
        "stages_cached": st.cached,
        "data": st.results["data"],
        "seeds": list(pipe.preset.seeds),
    }
    table["meta"] = meta
    table["claims"] = found
    (root / "table.json").write_text(json.dumps(table, indent=1, default=float) + "\n")
    md = table_markdown(table, len(pipe.preset.seeds))
    (root / "table.md").write_text(md)
    plot_accuracy(table, root / "accuracy.png")
    plot_curves(pipe.systems, st.results, root / "curves.png")
    for split in EVAL_SPLITS:
        plot_per_grade(pipe.systems, root, split, root / f"per_grade_{split.lower()}.png")
    has_eff = plot_efficiency(table, root / "data_efficiency.png")
    distill = [st.results[s.stage] for s in pipe.systems if s.group == "student"]
    lines = [
        f"# Reproduction report: {root.name}",
        "",
        f"- command: `{meta['command']}`",
        f"- commit: {meta['commit']}; hardware: {meta['hardware']}",
        f"- data: {meta['data']['source']}; "
        + ", ".join(f"{k} {v['pairs']} pairs" for k, v in meta["data"]["splits"].items()),
        f"- seeds: {meta['seeds']}; compute time of all stages: "
        f"{sum(st.seconds.values()) / 60:.1f} min (this invocation: {wall / 60:.1f} min, "
        f"{len(st.ran)} stages run, {len(st.cached)} cached)",
        "",
        "## Results",
        "",
        md,
        "## The paper's claims here (grade accuracy, paired over seeds)",
        "",
        "| claim | split | difference (points) | verdict |",
        "|---|---|---:|---|",
    ]
    for c in found:
        diff = "-" if c["mean"] is None else f"{c['mean'] * 100:+.1f}" + (
            f" ± {c['ci95'] * 100:.1f}" if c["ci95"] is not None else ""
        )  # fmt: skip
        lines.append(f"| {c['claim']} | {c['split']} | {diff} | {c['verdict']} |")
    if distill:
        lines += ["", "## Student"]
        for i, r in enumerate(distill):
            speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
            lines.append(
                f"- seed {pipe.preset.seeds[i]}: teacher `{r['teacher_stage']}` "
                f"({r['teacher_params']:,} params) -> student ({r['student_params']:,} params), "
                f"{r['train_pairs']} teacher traces trained on; greedy validation pairs/s "
                f"{r['teacher_pairs_per_s']:.1f} -> {r['student_pairs_per_s']:.1f} ({speed})"
            )
    lines += [
        "",
        "## Plots",
        "",
        "![accuracy](accuracy.png) ![curves](curves.png)",
        "![per-grade F1 RANDOM](per_grade_random.png) "
        "![per-grade F1 LONGTAIL](per_grade_longtail.png)",
    ]
    if has_eff:
        lines.append("![data efficiency](data_efficiency.png)")
    lines += ["", "## Stage times (s)", ""]
    lines += [f"- {k}: {v:.0f}" for k, v in st.seconds.items()]
    (root / "report.md").write_text("\n".join(lines) + "\n")
    return table


# ---- command line ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.reproduce",
        description="Reproduce the paper's ablations (module docstring).",
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument(
        "--data",
        choices=sorted(SHARED_FOLDERS),
        default=None,
        help="a real set from ../shared/data instead of the synthetic world",
    )
    ap.add_argument("--run", default=None, help="run name (default: [DATA-]PRESET)")
    ap.add_argument("--out", default="results", help="parent folder of the run folder")
    ap.add_argument("--force", action="append", default=[], metavar="STAGE",
                    help="redo stages matching a name, prefix or glob (repeatable)")  # fmt: skip
    ap.add_argument("--shared", default=str(SHARED_DATA), help="the shared data folder")
    ap.add_argument("--data-dir", default=None, help="where real sets are built (TFDS)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (override the preset)")
    return ap.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    preset = PRESETS[args.preset]()
    if args.seeds:
        preset = dataclasses.replace(preset, seeds=tuple(int(s) for s in args.seeds.split(",")))
    run = args.run or (f"{args.data}-{args.preset}" if args.data else args.preset)
    root = Path(args.out) / run
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = Pipeline(preset, root, args.data, args.force, args.data_dir, Path(args.shared))
    pipe.build()
    table = write_outputs(pipe, argv, time.perf_counter() - t0)
    print((root / "table.md").read_text())
    print(f"[reproduce] wrote {root}/report.md in {(time.perf_counter() - t0) / 60:.1f} min")
    return table


if __name__ == "__main__":
    main()
