"""`jaxgrm distill` end to end on tiny teachers: sequence and logit modes, the label-only
student, the unlabelled-pair path, and the CLI."""

import dataclasses
import json
import textwrap

import pytest
from click.testing import CliRunner

from jaxgrm.bundle import load_bundle
from jaxgrm.data.world import WorldConfig
from jaxgrm.distill import KDConfig
from jaxgrm.distill_run import DistillExperiment, run_distill_experiment
from jaxgrm.model import ModelConfig
from jaxgrm.prompts import PromptConfig, TraceFormat
from jaxgrm.train.sft import SFTConfig
from jaxgrm.train.state import OptimConfig

WORLD = WorldConfig(train_size=24, validation_size=6, random_size=4, longtail_size=4)
TEACHER = ModelConfig.tiny(
    d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, mlp_dim=128, max_seq_len=512
)
STUDENT = ModelConfig.tiny(
    d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=512
)
LABEL_ONLY = PromptConfig(
    format=TraceFormat.LABEL_ONLY, criteria=False, instructions=False, doc_budget=32
)
REASONING = PromptConfig(criteria=False, instructions=False, doc_budget=32)
TRAIN = SFTConfig(
    steps=3, batch_size=4, max_len=384, pack=False, save_every=3,
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=1),
)  # fmt: skip


def _experiment(teacher: str, **kw) -> DistillExperiment:
    base = dict(
        teacher=teacher, student=STUDENT, world=WORLD, train_pairs=12, sft=TRAIN,
        samples_per_pair=2, max_new_tokens=8, trace_batch_size=8, eval_examples=4,
        eval_max_new_tokens=8, eval_batch_size=4, eval_buckets=(128, 256),
    )  # fmt: skip
    return DistillExperiment(**{**base, **kw})


@pytest.fixture(scope="module")
def label_teacher(tmp_path_factory):
    """A label-only teacher: a few SFT steps on the world's labels."""
    from jaxgrm.traces import SFTExperiment, run_sft_experiment

    root = tmp_path_factory.mktemp("label_teacher")
    cfg = SFTExperiment(
        world=WORLD, model=TEACHER, vocab_size=400, prompt=LABEL_ONLY,
        sft=dataclasses.replace(TRAIN, steps=30, save_every=30, batch_size=8),
    )  # fmt: skip
    return run_sft_experiment(cfg, root)["bundle"]


@pytest.fixture(scope="module")
def reasoning_teacher(tmp_path_factory, label_teacher):
    """A random (untrained) reasoning-format teacher on the label teacher's tokenizer."""
    from jaxgrm.bundle import save_bundle
    from jaxgrm.model import create_model

    tok = load_bundle(label_teacher).tokenizer
    model = create_model(TEACHER.replace(vocab_size=tok.vocab_size), seed=3)
    path = tmp_path_factory.mktemp("reasoning_teacher") / "bundle"
    save_bundle(model, tok, REASONING, path, provenance={"stage": "random"})
    return str(path)


def _check_run(workdir, out, student_format: TraceFormat) -> dict:
    report = json.loads((workdir / "report.json").read_text())
    for who in ("teacher", "student"):
        sys_ = report[who]
        assert sys_["pairs"] == 4 and sys_["pairs_per_s"] > 0 and sys_["params"] > 0
        assert 0.0 <= sys_["metrics"]["xhs5"]["accuracy"] <= 1.0
    assert report["student"]["params"] < report["teacher"]["params"]
    assert report["speedup"] == pytest.approx(
        report["student"]["pairs_per_s"] / report["teacher"]["pairs_per_s"]
    )
    student = load_bundle(workdir / "bundle")
    assert student.prompt_config.format == student_format
    assert student.provenance["stage"] == "distill"
    assert student.model.cfg.d_model == STUDENT.d_model
    assert len(out["history"]) == TRAIN.steps
    return report


def test_sequence_mode_label_only_student_with_unlabelled_pairs(label_teacher, tmp_path):
    """Labelled pairs go through rejection; pairs marked unlabelled keep the teacher's trace;
    the label-only student copies the teacher's grade."""
    from jaxgrm.data.world import generate

    train = generate(WORLD)["train"][:12]
    train = [
        dataclasses.replace(ex, meta={**ex.meta, "unlabelled": True}) if i % 2 else ex
        for i, ex in enumerate(train)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(dataclasses.asdict(ex)) + "\n" for ex in train))
    workdir = tmp_path / "run"
    cfg = _experiment(label_teacher, mode="sequence", train=str(path))
    out = run_distill_experiment(cfg, workdir)
    report = _check_run(workdir, out, TraceFormat.LABEL_ONLY)
    assert report["mode"] == "sequence" and report["label_only"]
    meta = json.loads((workdir / "traces.jsonl.meta.json").read_text())
    stats = meta["stats"]
    assert stats["labelled"] == 6 and stats["unlabelled"] == 6
    rejection = stats["rejection"]
    assert rejection["accepted"] + len(rejection["rejected"]) == 6
    assert meta["records"] == rejection["accepted"] + 6  # every unlabelled pair kept
    assert report["train_pairs"] <= meta["records"]  # minus unlabelled traces without a grade


def test_logit_mode_world_traces_reasoning_student(reasoning_teacher, tmp_path):
    cfg = _experiment(
        reasoning_teacher, mode="logit", targets="world", teacher_prose=False,
        sft=dataclasses.replace(TRAIN, max_len=512), kd=KDConfig(kind="jsd", temperature=2.0),
    )  # fmt: skip
    out = run_distill_experiment(cfg, tmp_path)
    report = _check_run(tmp_path, out, TraceFormat.REASONING)
    assert report["targets"] == "world" and report["train_pairs"] == 12
    assert not (tmp_path / "traces.jsonl").exists()


def test_logit_label_only_student_needs_label_only_teacher(reasoning_teacher, tmp_path):
    cfg = _experiment(reasoning_teacher, mode="logit", label_only=True)
    with pytest.raises(ValueError, match="label-only teacher"):
        run_distill_experiment(cfg, tmp_path)


CONFIG = """
from jaxgrm.data.world import WorldConfig
from jaxgrm.distill_run import DistillExperiment
from jaxgrm.model import ModelConfig
from jaxgrm.distill import KDConfig
from jaxgrm.train.sft import SFTConfig
from jaxgrm.train.state import OptimConfig


def get_config():
    return DistillExperiment(
        teacher={teacher!r},
        student=ModelConfig.tiny(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                                 mlp_dim=64, max_seq_len=512),
        world=WorldConfig(train_size=24, validation_size=6, random_size=4, longtail_size=4),
        train_pairs=12,
        sft=SFTConfig(steps=3, batch_size=4, max_len=384, pack=False, save_every=3,
                      optim=OptimConfig(learning_rate=3e-3, warmup_steps=1)),
        kd=KDConfig(teacher_top_k=8, ce_weight=0.1),
        samples_per_pair=2, max_new_tokens=8, eval_examples=4, eval_max_new_tokens=8,
        eval_batch_size=4, eval_buckets=(128, 256),
    )
"""


def test_cli_logit_mode_top_k(label_teacher, tmp_path):
    from jaxgrm.cli import main

    config = tmp_path / "distill.py"
    config.write_text(textwrap.dedent(CONFIG.format(teacher=label_teacher)))
    workdir = tmp_path / "run"
    args = ["distill", "--config", str(config), "--workdir", str(workdir)]
    result = CliRunner().invoke(main, [*args, "--", "--mode", "LOGIT", "--sft.steps", "2"])
    assert result.exit_code == 0, result.output
    assert "speed-up:" in result.output and "student:" in result.output
    report = json.loads((workdir / "report.json").read_text())
    assert report["mode"] == "logit" and report["final_train"]["step"] == 2
    assert report["final_train"]["kd"] >= 0 and report["final_train"]["tokens"] > 0
    load_bundle(workdir / "bundle")

    other = tmp_path / "other.py"
    other.write_text("def get_config():\n    return 3\n")
    result = CliRunner().invoke(main, ["distill", "--config", str(other), "--workdir", "x"])
    assert result.exit_code != 0 and "not a DistillExperiment" in result.output
