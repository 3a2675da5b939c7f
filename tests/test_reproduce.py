"""The reproduce pipeline: configs load, stage caching and forcing, the aggregation, the label
rule teacher on real rows, and the smoke preset end to end."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from experiments import reproduce
from experiments.reproduce import Stages, mean_ci, paired_difference, verdict
from jaxgrm.data.schema import RelevanceExample
from jaxgrm.prompts import parse_text
from jaxgrm.rewards import Verdict, verify_steps
from jaxgrm.traces import label_trace, query_terms

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


# ---- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "experiments" / "configs").glob("*.py")))
def test_every_experiment_config_loads(path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    assert type(cfg).__name__.endswith("Experiment")


@pytest.mark.parametrize("name", sorted(reproduce.PRESETS))
def test_every_preset_builds(name):
    p = reproduce.PRESETS[name]()
    assert p.seeds and p.eval_examples > 0
    # RL steps must end on a validation point (the curves and the teacher choice read it).
    assert p.rl.steps % p.rl.eval_every == 0


def test_study_preset_has_what_the_study_needs():
    p = reproduce.preset_study()
    assert len(p.seeds) >= 3 and p.criteria_ablation and len(p.sam_variants) == 3
    assert p.data_sizes and max(p.data_sizes) < p.world.train_size


# ---- stages ------------------------------------------------------------------------------------
def _graph(st: Stages, calls: list, config="c1"):
    def body(name):
        def fn(d):
            calls.append(name)
            (d / "out.txt").write_text(name)
            return {"name": name}

        return fn

    st.run("a", [], body("a"))
    st.run("b", ["a"], body("b"), config)
    st.run("c", ["b"], body("c"))
    st.run("d", ["a"], body("d"))


def test_stages_cache_force_and_config(tmp_path):
    calls = []
    _graph(Stages(tmp_path, log=lambda *_: None), calls)
    assert calls == ["a", "b", "c", "d"]
    calls.clear()
    st = Stages(tmp_path, log=lambda *_: None)
    _graph(st, calls)
    assert calls == [] and st.cached == ["a", "b", "c", "d"]
    assert st.results["c"] == {"name": "c"}
    # Forcing b reruns b and its dependant c, not a or d.
    _graph(Stages(tmp_path, force=["b"], log=lambda *_: None), calls)
    assert calls == ["b", "c"]
    calls.clear()
    # A changed config reruns the stage and what depends on it.
    _graph(Stages(tmp_path, log=lambda *_: None), calls, config="c2")
    assert calls == ["b", "c"]


def test_stage_prefix_and_glob_patterns():
    st = Stages("/nonexistent", force=["rl-process", "eval-*-s1"])
    assert st.forced("rl-process-s0") and st.forced("rl-process-nocrit-s0")
    assert not st.forced("rl-processx-s0") and not st.forced("rl-outcome-s0")
    assert st.forced("eval-sft-label-s1") and not st.forced("eval-sft-label-s0")


def test_interrupted_stage_resumes_in_its_directory(tmp_path):
    st = Stages(tmp_path, log=lambda *_: None)
    st.run("a", [], lambda d: 1)

    def crash(d):
        (d / "checkpoint").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        st.run("b", ["a"], crash)
    seen = []
    st2 = Stages(tmp_path, log=lambda *_: None)
    st2.run("a", [], lambda d: 1)
    st2.run("b", ["a"], lambda d: seen.append((d / "checkpoint").read_text()) or 2)
    assert seen == ["half"]  # the partial work is still there to resume from
    # ...but not when the stage is forced: it starts clean.
    st3 = Stages(tmp_path, force=["b"], log=lambda *_: None)
    st3.run("a", [], lambda d: 1)
    st3.run("b", ["a"], lambda d: seen.append((d / "checkpoint").exists()) or 3)
    assert seen[-1] is False


# ---- aggregation -------------------------------------------------------------------------------
def test_mean_ci_matches_the_t_interval():
    # mean 2, sd 1, n 3: half-width t(0.975, 2) * 1 / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    out = mean_ci([1.0, 2.0, 3.0])
    assert out["mean"] == pytest.approx(2.0) and out["n"] == 3
    assert out["ci95"] == pytest.approx(2.4841, abs=1e-3)
    assert mean_ci([0.5]) == {"mean": 0.5, "ci95": None, "n": 1}
    assert mean_ci([None])["mean"] is None


def test_paired_difference_and_verdicts():
    def row(name, values):
        cell = {"values": {str(i): v for i, v in enumerate(values)}}
        return {
            "system": name,
            "group": "main",
            "stages": [],
            "splits": {"RANDOM": {"accuracy": cell}},
        }

    table = {"rows": [row("A", [0.5, 0.6, 0.7]), row("B", [0.4, 0.5, 0.6])]}
    diff = paired_difference(table, "A", "B", "RANDOM")
    assert diff["mean"] == pytest.approx(0.1) and diff["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert verdict(diff).startswith("holds")
    assert verdict({"mean": -0.1, "ci95": 0.05, "n": 3}).startswith("reversed")
    assert verdict({"mean": 0.1, "ci95": 0.2, "n": 3}).startswith("not established")
    assert paired_difference(table, "A", "missing", "RANDOM")["mean"] is None


# ---- the label rule teacher --------------------------------------------------------------------
@pytest.mark.parametrize(
    "query,doc,label,scale",
    [
        ("cordless drill 18v", "DeWalt 20V MAX cordless drill/driver kit", 3, "homedepot3"),
        ("cordless drill 18v", "garden hose 50 ft", 1, "homedepot3"),
        ("how to treat a cold", "Cold remedies: what works", 2, "trec4"),
        ("糖尿病的早期症状", "糖尿病早期症状有哪些", 3, "kuake4"),
        ("糖尿病的早期症状", "高血压的治疗方法", 0, "kuake4"),
        ("the", "nothing", 0, "qbqtc3"),
    ],
)
def test_label_trace_passes_the_real_data_verifiers(query, doc, label, scale):
    ex = RelevanceExample(qid="q", query=query, doc=doc, label=label, scale=scale, source="t")
    text, right = label_trace(ex)
    parsed = parse_text(text, scale=scale)
    assert parsed.grade == label
    assert verify_steps(parsed, ex) == dict.fromkeys(right, Verdict.CORRECT)


def test_query_terms():
    assert query_terms("What is the best cordless drill") == ["best", "cordless", "drill"]
    assert query_terms("感冒 发烧怎么办") == ["感冒", "发烧", "怎么", "办"]
    assert query_terms("a b c d e f g h", max_terms=3) == []  # single letters are dropped
    assert query_terms("1 2 3 4 5 6", max_terms=2) == ["5", "6"]


@pytest.mark.parametrize("name", ["kuake_qtr", "homedepot"])
def test_real_data_loads_and_every_label_trace_verifies(name, tmp_path):
    folder = SHARED / reproduce.SHARED_FOLDERS[name]
    if not folder.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{folder} is missing in CI")
        pytest.skip(f"{folder} not here")
    p = reproduce.preset_smoke()
    splits = reproduce.load_data(name, p, tmp_path / "tfds", SHARED)
    assert set(splits) == {"train", "validation", "RANDOM", "LONGTAIL"}
    assert len(splits["train"]) == p.real_train_pairs and splits["LONGTAIL"]
    train_q = {ex.qid for ex in splits["train"]}
    assert not train_q & {ex.qid for ex in splits["RANDOM"] + splits["LONGTAIL"]}
    for ex in splits["train"][:200]:
        text, _ = label_trace(ex)
        parsed = parse_text(text, scale=ex.scale)
        assert parsed.grade == ex.label
        assert set(verify_steps(parsed, ex).values()) == {Verdict.CORRECT}, (ex, text)


# ---- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_pipeline_end_to_end_then_fully_cached(tmp_path, capsys):
    table = reproduce.main(["--preset", "smoke", "--out", str(tmp_path)])
    root = tmp_path / "smoke"
    names = ("table.md", "table.json", "report.md", "accuracy.png", "curves.png")
    names += ("per_grade_random.png", "per_grade_longtail.png", "data_efficiency.png")
    for name in names:
        assert (root / name).stat().st_size > 0, name
    systems = {r["system"] for r in table["rows"]}
    assert {"SFT-Label", "SFT-Reasoning", "OutcomeRL-Reasoning", "ProcessRL-Reasoning",
            "SFT-Reasoning (no criteria)", "ProcessRL (SAM positive)",
            "Student (distilled)"} <= systems  # fmt: skip
    for r in table["rows"]:
        splits = ("RANDOM",) if r["group"] == "efficiency" else ("RANDOM", "LONGTAIL")
        assert set(r["splits"]) == set(splits)
    saved = json.loads((root / "table.json").read_text())
    assert saved["meta"]["stages_cached"] == [] and "distill-s0" in saved["meta"]["stages_run"]
    # A second invocation trains nothing; forcing the student redoes it and its evaluation.
    table2 = reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--force", "distill"])
    meta = table2["meta"]
    assert meta["stages_run"] == ["distill-s0", "eval-distill-s0"]
    assert "sft-reasoning-s0" in meta["stages_cached"]
