"""Teacher traces (world and model teachers, rejection sampling), their JSONL form, and
`jaxgrm sft` end to end on a tiny world."""

import json
import textwrap

import pytest
from click.testing import CliRunner

from jaxgrm.data.world import WorldConfig, generate
from jaxgrm.prompts import parse_text
from jaxgrm.traces import (
    WORLD_TEACHER,
    model_traces,
    read_trace_meta,
    read_trace_records,
    read_traces,
    world_traces,
    write_traces,
)

TINY_WORLD = WorldConfig(train_size=60, validation_size=8, random_size=8, longtail_size=8)

# A label-only SFT of a 2-layer model: seconds on a CPU, and it answers with grades.
TINY_CONFIG = """
from jaxgrm.data.world import WorldConfig
from jaxgrm.model import ModelConfig
from jaxgrm.prompts import PromptConfig, TraceFormat
from jaxgrm.traces import SFTExperiment
from jaxgrm.train.sft import SFTConfig
from jaxgrm.train.state import OptimConfig


def get_config():
    return SFTExperiment(
        world=WorldConfig(train_size=60, validation_size=8, random_size=8, longtail_size=8),
        model=ModelConfig.tiny(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32,
                               mlp_dim=128, max_seq_len=512),
        vocab_size=400,
        prompt=PromptConfig(format=TraceFormat.LABEL_ONLY, criteria=False, instructions=False,
                            doc_budget=32),
        sft=SFTConfig(steps=4, batch_size=8, max_len=384, pack=False, save_every=4,
                      eval_every=10, optim=OptimConfig(learning_rate=3e-3, warmup_steps=1)),
        eval_examples=4,
        eval_max_new_tokens=6,
        eval_buckets=(128, 256),
    )
"""


@pytest.fixture(scope="module")
def world():
    return generate(TINY_WORLD)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """`jaxgrm sft` on the tiny config: (workdir, CLI result)."""
    from jaxgrm.cli import main

    root = tmp_path_factory.mktemp("sft")
    config = root / "tiny_sft.py"
    config.write_text(textwrap.dedent(TINY_CONFIG))
    workdir = root / "run"
    result = CliRunner().invoke(
        main, ["sft", "--config", str(config), "--workdir", str(workdir), "--", "--sft.steps", "30"]
    )
    return workdir, result


def test_world_traces_keep_every_pair_with_provenance(world):
    train = world["train"]
    records = world_traces(train, error_rate=0.3, seed=1, prose=False)
    assert len(records) == len(train)
    assert [r.example for r in records] == train
    for rec in records:
        assert rec.provenance["teacher"] == WORLD_TEACHER
        assert rec.provenance["error_rate"] == 0.3 and rec.provenance["seed"] == 1
        assert set(rec.steps_right) == {"step1", "step2", "step3"}
        assert parse_text(rec.trace).well_formed
    assert any(not all(r.steps_right.values()) for r in records)  # wrong steps are kept
    again = world_traces(train, error_rate=0.3, seed=1, prose=False)
    assert [r.trace for r in again] == [r.trace for r in records]
    perfect = world_traces(train, error_rate=0.0, seed=1, prose=True)
    assert all(parse_text(r.trace).grade == r.example.label for r in perfect)


def test_jsonl_round_trip(world, tmp_path):
    records = world_traces(world["train"][:10], error_rate=0.2, seed=0)
    stats = {"pairs": 10}
    path = write_traces(tmp_path / "traces.jsonl", records, stats)
    assert read_trace_records(path) == records
    examples = read_traces(path)
    assert [ex.meta["trace"] for ex in examples] == [r.trace for r in records]
    assert examples[0].qid == records[0].example.qid and examples[0].meta["domain"]
    meta = read_trace_meta(path)
    assert meta["records"] == 10 and meta["stats"] == stats
    assert meta["provenance"]["teacher"] == WORLD_TEACHER
    row = json.loads(path.read_text().splitlines()[0])
    assert {"qid", "query", "doc", "label", "scale", "trace", "provenance"} <= set(row)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({k: v for k, v in row.items() if k != "trace"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_trace_records(bad)


def test_sft_command_leaves_a_loadable_bundle(sft_run):
    from jaxgrm.bundle import load_bundle

    workdir, result = sft_run
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output and "bundle:" in result.output
    bundle = load_bundle(workdir / "bundle")
    assert bundle.provenance["stage"] == "sft" and bundle.provenance["step"] == 30  # override
    assert bundle.scale == "xhs5"
    assert len(read_traces(workdir / "traces.jsonl")) == 60
    metrics = [json.loads(x) for x in (workdir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val/accuracy" in m] == [10, 20, 30]


def test_sft_command_rejects_a_config_of_another_kind(tmp_path):
    from jaxgrm.cli import main

    config = tmp_path / "other.py"
    config.write_text("def get_config():\n    return {'steps': 1}\n")
    result = CliRunner().invoke(main, ["sft", "--config", str(config), "--workdir", "w"])
    assert result.exit_code != 0 and "not an SFTExperiment" in result.output


def _check_stats(records, stats, examples):
    assert stats["pairs"] == len(examples)
    assert stats["accepted"] == len(records)
    per = stats["per_grade"].values()
    assert sum(g["pairs"] for g in per) == len(examples)
    assert sum(g["accepted"] for g in per) == len(records)
    # every pair is either kept or listed as rejected
    assert len(records) + len(stats["rejected"]) == len(examples)
    kept = {id(r.example) for r in records}
    for rej in stats["rejected"]:
        assert id(examples[rej["index"]]) not in kept
        assert rej["label"] == examples[rej["index"]].label
    for rec in records:
        assert parse_text(rec.trace, scale=rec.example.scale).grade == rec.example.label


def test_model_traces_rejection_sampling(sft_run, world):
    from jaxgrm.bundle import load_bundle

    workdir, result = sft_run
    assert result.exit_code == 0, result.output
    bundle = load_bundle(workdir / "bundle")
    examples = world["train"][:12]
    common = dict(batch_size=8, prompt_buckets=(128, 256), seed=3)
    records, stats = model_traces(
        bundle, examples, samples_per_pair=4, max_new_tokens=6, teacher="tiny", **common
    )
    _check_stats(records, stats, examples)
    assert stats["accepted"] > 0  # the label-only model answers with grades
    prov = records[0].provenance
    assert prov["teacher"] == "tiny" and prov["checkpoint_step"] == 30
    assert prov["sampling"]["samples_per_pair"] == 4 and prov["sampling"]["max_new_tokens"] == 6
    # One token cannot hold an answer block: nothing is accepted, and every pair is reported.
    records, stats = model_traces(
        workdir / "bundle", examples, samples_per_pair=2, max_new_tokens=1, **common
    )
    _check_stats(records, stats, examples)
    assert records == [] and [r["index"] for r in stats["rejected"]] == list(range(12))
    assert stats["acceptance_rate"] == 0.0 and stats["invalid_rate"] == 1.0
