"""The synthetic relevance world: determinism, balance, splits, step truth, teacher, baselines."""

import collections
import dataclasses
import random
import re

import pytest

from jaxgrm.data.schema import STEP_KEYS, RelevanceExample
from jaxgrm.data.world import (
    DOMAIN_CRITERIA,
    GRADES,
    RULES,
    SPLITS,
    WorldConfig,
    apply_criteria,
    criteria_lines,
    generate,
    make_inventory,
    rule_oracle,
    teacher_trace,
)
from jaxgrm.data.world_text import Facts
from jaxgrm.data.world_vocab import PIECES

SMALL = WorldConfig.small()


@pytest.fixture(scope="module")
def world():
    return generate(SMALL)


def _key(ex):
    s1 = ex.steps["step1"]
    return (s1["subject"], frozenset(s1["constraints"]), s1["intent"])


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


# A tiny local reader of the trace format (the real parser lives in jaxgrm.prompts).
_STEP = re.compile(r"<(step\d)>(.*?)</\1>")


def _read_trace(trace):
    steps = {}
    for name, body in _STEP.findall(trace):
        conclusion = body.split("=>", 1)[1]
        values = {}
        for part in conclusion.split(";"):
            key, value = (x.strip() for x in part.split(":", 1))
            if key in ("constraints", "covers"):
                value = set() if value == "none" else {v.strip() for v in value.split(",")}
            values[key] = value
        steps[name] = values
    answer = int(re.search(r"<answer>\s*(-?\d+)\s*</answer>", trace).group(1))
    return steps, answer


def _as_read(values):
    return {k: set(v) if isinstance(v, list) else v for k, v in values.items()}


def test_config_is_validated():
    for bad in (
        {"train_size": 0},
        {"teacher_error_rate": 1.5},
        {"heldout_fraction": 0.0},
        {"notes_per_query": (3, 2)},
        {"grade_weights": (1, 1, 1)},
    ):
        with pytest.raises(ValueError):
            WorldConfig(**bad)


def test_same_config_same_examples(world):
    again = generate(SMALL)
    for split in SPLITS:
        assert [e.to_json() for e in again[split]] == [e.to_json() for e in world[split]]
    other = generate(dataclasses.replace(SMALL, seed=1))
    assert [e.query for e in other["train"][:50]] != [e.query for e in world["train"][:50]]


def test_sizes_and_valid_records(world):
    for split in SPLITS:
        examples = world[split]
        assert len(examples) == SMALL.size(split)
        for ex in examples:
            assert isinstance(ex, RelevanceExample) and ex.scale == "xhs5"
            assert RelevanceExample.from_json(ex.to_json()) == ex
            for name, values in ex.steps.items():
                assert set(values) <= set(STEP_KEYS[name])
            s1, s2, s3 = ex.steps["step1"], ex.steps["step2"], ex.steps["step3"]
            assert set(s1) == {"subject", "constraints", "intent"}
            assert set(s2) == {"subject", "covers", "format"} and set(s3) == {"rule", "bound"}
            # step1 and step2 values are copyable from the prompt text
            assert s1["subject"] in ex.query and all(c in ex.query for c in s1["constraints"])
            assert set(s2["covers"]) <= set(s1["constraints"])
            if not ex.meta["spam"]:
                assert s2["subject"] in f"{ex.doc_title} {ex.doc}"
            meta = ex.meta
            assert meta["split"] == split and meta["rule"] == s3["rule"]
            assert meta["criteria"] == criteria_lines(meta["domain"])
            assert meta["entity_seen"] == (meta["longtail_kind"] != "entity")


def test_grade_balance(world):
    for split in SPLITS:
        counts = collections.Counter(ex.label for ex in world[split])
        n = len(world[split])
        assert max(counts.values()) / n <= 0.40, (split, counts)  # the majority baseline
        if split == "random":
            assert all(0.08 <= counts[g] / n <= 0.40 for g in GRADES), counts


def test_oracle_reads_step_truth_and_rules_reproduce_grades(world):
    for split in SPLITS:
        for ex in world[split]:
            assert rule_oracle(ex) == ex.label
            m = ex.meta
            facts = Facts(m["spam"], m["relation"], m["format"], dict(m["constraint_status"]))
            assert apply_criteria(m["domain"], facts, m["intent"]) == (m["rule"], ex.label)
            op = ex.steps["step3"]["bound"].split()[0]
            assert op == RULES[m["rule"]].op


def test_every_rule_branch_is_covered(world):
    seen = {(ex.meta["domain"], ex.meta["rule"]) for ex in world["train"]}
    expected = {(d, r) for d, rules in DOMAIN_CRITERIA.items() for r, _ in rules}
    assert seen == expected
    seen_random = {(ex.meta["domain"], ex.meta["rule"]) for ex in world["random"]}
    assert seen_random == expected


def test_criteria_differ_by_domain():
    grades = collections.defaultdict(set)
    for rules in DOMAIN_CRITERIA.values():
        for rule, grade in rules:
            grades[rule].add(grade)
    assert {r for r, g in grades.items() if len(g) > 1} >= {"other-subject", "constraint-violated"}
    present = {d: {r for r, _ in rules} for d, rules in DOMAIN_CRITERIA.items()}
    assert "ad-banned" in present["beauty"] and "ad-capped" in present["food"]
    assert not {"ad-banned", "ad-capped"} & present["travel"]
    assert len({tuple(criteria_lines(d)) for d in DOMAIN_CRITERIA}) == len(DOMAIN_CRITERIA)


def test_splits_are_query_disjoint(world):
    keys = {s: {_key(ex) for ex in world[s]} for s in SPLITS}
    texts = {s: {ex.query for ex in world[s]} for s in SPLITS}
    qids = {s: {ex.qid for ex in world[s]} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not keys[a] & keys[b] and not texts[a] & texts[b] and not qids[a] & qids[b]
    for split in SPLITS:  # one qid per query text
        by_qid = collections.defaultdict(set)
        for ex in world[split]:
            by_qid[ex.qid].add(ex.query)
        assert all(len(q) == 1 for q in by_qid.values())


def test_longtail_subjects_unseen_but_made_of_seen_pieces(world):
    inv = make_inventory(SMALL)
    pieces = {a + b: (a, b) for a in PIECES for b in PIECES}
    train_words, train_names = set(), set()
    for ex in world["train"] + world["validation"] + world["random"]:
        train_words |= _words(f"{ex.query} {ex.doc_title} {ex.doc}")
    for ex in world["train"]:
        train_names |= {s.split(" ", 1)[0] for s in _subjects(ex)}
    firsts = {pieces[n][0] for n in train_names}
    seconds = {pieces[n][1] for n in train_names}
    longtail = world["longtail"]
    entity = [ex for ex in longtail if ex.meta["longtail_kind"] == "entity"]
    combo = [ex for ex in longtail if ex.meta["longtail_kind"] == "combo"]
    assert len(entity) > 0.3 * len(longtail) and len(combo) > 0.3 * len(longtail)
    for ex in entity:
        name = ex.steps["step1"]["subject"].split(" ", 1)[0]
        assert name in inv.heldout_names and name not in train_words
        assert pieces[name][0] in firsts and pieces[name][1] in seconds
    other_pairs = {
        frozenset(ex.steps["step1"]["constraints"])
        for s in ("train", "validation", "random")
        for ex in world[s]
    }
    for ex in combo:
        pair = frozenset(ex.steps["step1"]["constraints"])
        assert len(pair) == 2 and pair not in other_pairs and ex.meta["entity_seen"]


def test_heldout_names_reuse_training_pieces():
    inv = make_inventory(WorldConfig())
    pieces = {a + b: (a, b) for a in PIECES for b in PIECES}
    firsts = {pieces[n][0] for n in inv.train_names}
    seconds = {pieces[n][1] for n in inv.train_names}
    assert inv.heldout_names and not set(inv.heldout_names) & set(inv.train_names)
    for name in inv.heldout_names:
        assert pieces[name][0] in firsts and pieces[name][1] in seconds


def _subjects(ex):
    return {ex.steps["step1"]["subject"], ex.steps["step2"]["subject"]}


def test_teacher_without_errors_writes_the_truth(world):
    rng = random.Random(0)
    for ex in world["random"][:300]:
        trace, correct = teacher_trace(ex, rng, 0.0)
        steps, answer = _read_trace(trace)
        assert all(correct.values()) and answer == ex.label
        for name in ("step1", "step2", "step3"):
            assert steps[name] == _as_read(ex.steps[name]), (name, trace)


def test_teacher_mistakes_never_leak_heldout_names(world):
    heldout = set(make_inventory(SMALL).heldout_names)
    rng = random.Random(2)
    for ex in world["train"][:1000]:
        trace, _ = teacher_trace(ex, rng, 1.0)
        assert not _words(trace) & heldout


def test_teacher_error_rates(world):
    rate, propagation = 0.2, 0.5
    rng = random.Random(1)
    examples = world["train"]
    wrong = collections.Counter()
    answers_wrong = 0
    for ex in examples:
        trace, correct = teacher_trace(ex, rng, rate, propagation)
        steps, answer = _read_trace(trace)
        for name in ("step1", "step2", "step3"):
            assert (steps[name] == _as_read(ex.steps[name])) == correct[name], trace
            wrong[name] += not correct[name]
        # the answer follows the teacher's own step3 bound
        assert answer == int(steps["step3"]["bound"].split()[-1])
        answers_wrong += answer != ex.label
    n = len(examples)  # 3000: binomial sd ~0.008, tolerance ~4 sd
    early = 1 - (1 - rate) ** 2
    expected3 = rate + (1 - rate) * early * propagation
    assert abs(wrong["step1"] / n - rate) < 0.03 and abs(wrong["step2"] / n - rate) < 0.03
    assert abs(wrong["step3"] / n - expected3) < 0.035
    assert 0.5 * expected3 < answers_wrong / n <= wrong["step3"] / n


def test_baselines_show_the_task_needs_reasoning():
    from jaxgrm.data.world_stats import format_stats, stats_report

    report = stats_report(SMALL)
    for split in ("random", "longtail"):
        row = report["splits"][split]
        assert row["oracle_acc"] == 1.0
        assert row["blind_oracle_acc"] < 0.9  # the criteria block matters
        assert row["majority_acc"] <= 0.40
        assert row["logreg_acc"] <= row["oracle_acc"] - 0.15, row
        assert 0.5 < row["answer_acc"] < 0.95 and 0.05 < row["step_error"] < 0.4
    table = format_stats(report)
    assert all(split in table for split in SPLITS) and "logreg" in table


def test_tfds_round_trip(tmp_path, world):
    tfds = pytest.importorskip("tensorflow_datasets")
    from jaxgrm.data.builders.world import World
    from jaxgrm.data.schema import from_tfds_record

    builder = World(config="small", data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    source = tfds.data_source("world/small", data_dir=str(tmp_path))
    for split in SPLITS:
        back = sorted(from_tfds_record(r).to_json() for r in source[split])
        assert back == sorted(ex.to_json() for ex in world[split])
