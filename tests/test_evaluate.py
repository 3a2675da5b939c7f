"""Parity of jaxgrm.evaluate with scikit-learn, its documented rules, the report and the plots."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxgrm import evaluate as ev

SCALES = [(-1, 0, 1, 2, 3), (0, 1, 2), (1, 2, 3, 4)]


def _random_case(grades, seed, n=400, invalid_rate=0.1, num_queries=40):
    """Labels, predictions (INVALID marked), qids (some single-document queries), distributions."""
    rng = np.random.default_rng(seed)
    g = np.asarray(grades)
    labels = rng.choice(g, size=n)
    pred = np.where(rng.random(n) < 0.5, labels, rng.choice(g, size=n))
    pred = np.where(rng.random(n) < invalid_rate, ev.INVALID, pred)
    qids = np.array([f"q{i}" for i in rng.integers(0, num_queries, size=n)], dtype=object)
    qids[:3] = ["single-a", "single-b", "single-c"]
    probs = rng.dirichlet(np.ones(len(g)), size=n)
    return labels, pred, qids, probs


def _sklearn_ndcg(scores, gains, qids, k=10):
    out = {}
    for q in np.unique(qids):
        idx = qids == q
        if idx.sum() < 2 or not gains[idx].any():
            continue
        out[str(q)] = skm.ndcg_score(gains[idx][None], scores[idx][None], k=k)
    return out


@pytest.mark.parametrize("grades", SCALES)
@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_sklearn(grades, seed):
    labels, pred, qids, probs = _random_case(grades, seed)
    report = ev.evaluate(pred, labels, grades, qids=qids, grade_probs=probs)
    labels_ext = list(grades) + [ev.INVALID]

    assert report.accuracy == pytest.approx(skm.accuracy_score(labels, pred))
    macro = skm.f1_score(labels, pred, labels=list(grades), average="macro", zero_division=0)
    assert report.macro_f1 == pytest.approx(macro)
    p, r, f, s = skm.precision_recall_fscore_support(
        labels, pred, labels=list(grades), average=None, zero_division=0
    )
    np.testing.assert_allclose([row["precision"] for row in report.per_grade], p)
    np.testing.assert_allclose([row["recall"] for row in report.per_grade], r)
    np.testing.assert_allclose([row["f1"] for row in report.per_grade], f)
    np.testing.assert_array_equal([row["support"] for row in report.per_grade], s)
    cm = skm.confusion_matrix(labels, pred, labels=labels_ext)
    np.testing.assert_array_equal(report.confusion, cm[: len(grades)])
    valid = pred != ev.INVALID
    assert report.mean_abs_error == pytest.approx(
        skm.mean_absolute_error(labels[valid], pred[valid])
    )
    assert report.invalid_rate == pytest.approx(np.mean(~valid))

    # NDCG@10 by expected grade, gains 2**(label - min) - 1, per query then averaged.
    expected = probs @ np.asarray(grades, dtype=np.float64)
    gains = np.exp2(labels - min(grades)) - 1.0
    want = _sklearn_ndcg(expected, gains, qids)
    assert set(report.ndcg_per_query) == set(want)
    for q, value in want.items():
        assert report.ndcg_per_query[q] == pytest.approx(value)
    assert report.ndcg == pytest.approx(np.mean(list(want.values())))
    assert report.ndcg_skipped_single_doc == 3
    num_q = len(np.unique(qids))
    assert len(want) + report.ndcg_skipped_no_gain + report.ndcg_skipped_single_doc == num_q


@pytest.mark.parametrize("grades", SCALES)
def test_ndcg_ties_and_linear_gain_match_sklearn(grades):
    """Without distributions the (tied) predicted grades rank; invalid outputs rank last."""
    labels, pred, qids, _ = _random_case(grades, seed=7, num_queries=12)
    report = ev.evaluate(pred, labels, grades, qids=qids, gain="linear", k=5)
    scores = np.where(pred == ev.INVALID, min(grades) - 1, pred).astype(np.float64)
    want = _sklearn_ndcg(scores, (labels - min(grades)).astype(np.float64), qids, k=5)
    assert report.ndcg == pytest.approx(np.mean(list(want.values())))
    for q, value in want.items():
        assert report.ndcg_per_query[q] == pytest.approx(value)


def test_ndcg_hand_computed():
    # Scale 0..2, gains 2**label - 1: A (label 2, gain 3), B (1, gain 1), C (0, gain 0).
    # Ranked A, C, B: DCG = 3/log2(2) + 0/log2(3) + 1/log2(4) = 3.5;
    # ideal A, B, C: 3 + 1/log2(3) = 3.63093 -> NDCG = 0.963946.
    probs = np.array([[0.0, 0.0, 1.0], [0.5, 0.5, 0.0], [0.2, 0.6, 0.2]])  # E = 2, 0.5, 1
    report = ev.evaluate([2, 1, 0], [2, 1, 0], (0, 1, 2), qids=["q"] * 3, grade_probs=probs)
    assert report.ndcg == pytest.approx(3.5 / (3 + 1 / math.log2(3)))


def test_ndcg_skips_queries_without_gain_and_single_documents():
    labels = [0, 0, 1, 2, 2]
    qids = ["zero", "zero", "single", "ok", "ok"]
    report = ev.evaluate(labels, labels, (0, 1, 2), qids=qids)
    assert report.ndcg_skipped_no_gain == 1
    assert report.ndcg_skipped_single_doc == 1
    assert report.ndcg_per_query == {"ok": 1.0}
    only_single = ev.evaluate([1, 2], [1, 2], (0, 1, 2), qids=["a", "b"])
    assert only_single.ndcg is None and only_single.ndcg_skipped_single_doc == 2


def test_grade_never_predicted():
    grades = (-1, 0, 1, 2, 3)
    rng = np.random.default_rng(3)
    labels = rng.choice(grades, size=200)
    pred = np.where(labels == 3, 2, labels)  # grade 3 is never predicted
    report = ev.evaluate(pred, labels, grades)
    top = report.per_grade[-1]
    assert top["grade"] == 3 and top["precision"] == 0.0 and top["f1"] == 0.0
    want = skm.f1_score(labels, pred, labels=list(grades), average="macro", zero_division=0)
    assert report.macro_f1 == pytest.approx(want)


def test_all_invalid():
    grades = (0, 1, 2)
    labels = [0, 1, 2, 2, 1]
    report = ev.evaluate([None] * 5, labels, grades, qids=["a", "a", "a", "b", "b"])
    assert report.accuracy == 0.0 and report.macro_f1 == 0.0
    assert report.invalid_rate == 1.0 and report.mean_abs_error is None
    assert [row[-1] for row in report.confusion] == [1, 2, 2]
    assert sum(map(sum, report.confusion)) == 5
    assert report.ndcg is not None  # every score tied: the tie-averaged DCG


def test_list_and_array_inputs_agree_and_off_scale_is_invalid():
    grades = (1, 2, 3, 4)
    labels = [1, 2, 3, 4, 4]
    from_list = ev.evaluate([1, None, 9, 4, 0], labels, grades)
    from_array = ev.evaluate(np.array([1, ev.INVALID, ev.INVALID, 4, ev.INVALID]), labels, grades)
    assert from_list == from_array
    assert from_list.invalid_rate == pytest.approx(0.6)
    with pytest.raises(ValueError, match="not a grade"):
        ev.evaluate([1], [7], grades)
    with pytest.raises(ValueError, match="predictions"):
        ev.evaluate([1, 2], [1], grades)
    with pytest.raises(ValueError, match="qids"):
        ev.evaluate([1], [1], grades, grade_probs=np.ones((1, 4)))


def test_step_metrics():
    verdicts = np.array(
        [
            [1, 1, 1],  # all right
            [1, 0, 1],  # a wrong step
            [1, -1, 1],  # unverifiable step ignored: all right
            [-1, -1, -1],  # nothing verified: not all right
        ]
    )
    m = ev.step_metrics(verdicts)
    assert m["step_accuracy"] == pytest.approx(7 / 8)
    assert m["step_accuracy_per_step"] == [1.0, pytest.approx(1 / 2), 1.0]
    assert m["steps_verified"] == 8
    assert m["all_steps_right"] == pytest.approx(2 / 4)
    report = ev.evaluate([0, 1, 2, 0], [0, 1, 2, 2], (0, 1, 2), step_verdicts=verdicts)
    assert report.all_steps_right == m["all_steps_right"]
    assert ev.step_metrics(np.full((2, 3), -1))["step_accuracy"] is None
    with pytest.raises(ValueError):
        ev.step_metrics(np.array([[2, 1]]))


def test_report_json_roundtrip(tmp_path):
    labels, pred, qids, probs = _random_case((-1, 0, 1, 2, 3), seed=5)
    verdicts = np.random.default_rng(0).integers(-1, 2, size=(len(labels), 3))
    report = ev.evaluate(
        pred, labels, (-1, 0, 1, 2, 3), qids=qids, grade_probs=probs, step_verdicts=verdicts,
        meta={"system": "sft", "split": "random"},
    )  # fmt: skip
    path = tmp_path / "out" / "report.json"
    report.to_json(path)
    assert ev.Report.from_json(path) == report
    empty = ev.evaluate([None], [0], (0, 1))  # None values are written as null
    empty.to_json(tmp_path / "empty.json")
    assert ev.Report.from_json(tmp_path / "empty.json") == empty


def test_plots_written(tmp_path):
    labels, pred, qids, _ = _random_case((-1, 0, 1, 2, 3), seed=2)
    a = ev.evaluate(pred, labels, (-1, 0, 1, 2, 3))
    b = ev.evaluate(labels, labels, (-1, 0, 1, 2, 3))
    ev.plot_confusion(a, tmp_path / "cm.png")
    ev.plot_per_grade_f1({"sft": a, "oracle": b}, tmp_path / "f1.png")
    for name in ("cm.png", "f1.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    with pytest.raises(ValueError):
        ev.plot_per_grade_f1({"x": a, "y": ev.evaluate([0], [0], (0, 1))}, tmp_path / "bad.png")
