"""Relevance metrics from (prediction, label, query id), a JSON report and two plots.

Everything is plain numpy over arrays of length N (examples); grades are the grades of one scale
(`schema.SCALES[name].grades`), lowest first, G of them.

Rules (decided here; the parity tests against scikit-learn follow them):

- Invalid outputs. A trace without a parsable answer is passed as ``None`` in a list, or as
  ``INVALID`` in an int array; a prediction that is not a grade of the scale is invalid too. An
  invalid prediction is wrong for accuracy and counts in its denominator. For precision, recall
  and F1 it is a prediction of no grade: a false negative of the true grade (lowering its recall)
  and a false positive of none (scikit-learn's result when the marker is an extra label left out
  of ``labels=``). Macro-F1 is the unweighted mean over all G grades, a grade without support or
  predictions contributing 0 (``zero_division=0``). The confusion matrix has an extra last column
  "invalid". Mean absolute grade error is over valid predictions only (None when there are none);
  the invalid-output rate is reported beside it.
- NDCG@k (k = 10). Per query, documents are ranked by expected grade ``sum_g p_g * g`` from the
  model's grade distribution ``grade_probs_NG`` (rows normalised; a row with no mass ranks below
  every grade). Without distributions the predicted grade is the score and invalid predictions
  rank last. Tied scores share their positions' discounts (the tie-averaged DCG that
  ``sklearn.metrics.ndcg_score`` uses by default). Gains come from the human label with
  rel = label - min grade: ``2**rel - 1`` ("exponential", default) or ``rel`` ("linear"), so the
  lowest grade has gain 0 on every scale. The reported value is the mean over queries; queries
  whose ideal DCG is 0 (every document at the lowest grade) and single-document queries (no
  ranking to judge) are skipped and counted.
- Reasoning steps. ``step_verdicts_NP`` holds 1 (correct), 0 (wrong), -1 (unverifiable or absent)
  for P steps per trace. Step accuracy is correct / (correct + wrong), pooled over all steps, and
  also per step position. The all-steps-right rate is the fraction of all N traces with no wrong
  step and at least one verified step (a trace with nothing verifiable does not count as right).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

INVALID = int(np.iinfo(np.int32).min)  # marker of an invalid prediction in int arrays
GAINS = ("exponential", "linear")


# ---- inputs -------------------------------------------------------------------------------------
def as_predictions(predictions: Sequence[int | None] | np.ndarray, grades: Sequence[int]):
    """Int64 array [N] with every invalid prediction (None, INVALID, off-scale) set to INVALID."""
    if isinstance(predictions, np.ndarray):
        if not np.issubdtype(predictions.dtype, np.integer):
            raise TypeError(f"predictions must be integers, got dtype {predictions.dtype}")
        pred = predictions.astype(np.int64).reshape(-1)
    else:
        pred = np.array([INVALID if p is None else int(p) for p in predictions], dtype=np.int64)
    return np.where(np.isin(pred, np.asarray(grades)), pred, INVALID)


def _labels(labels, grades) -> np.ndarray:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    off = y[~np.isin(y, np.asarray(grades))]
    if off.size:
        raise ValueError(f"label {int(off[0])} is not a grade of {tuple(grades)}")
    return y


def _grades(grades: Sequence[int]) -> tuple[int, ...]:
    g = tuple(int(x) for x in grades)
    if not g or tuple(sorted(set(g))) != g:
        raise ValueError(f"grades must be distinct and sorted ascending, got {g}")
    return g


# ---- classification metrics ---------------------------------------------------------------------
def accuracy(pred_N: np.ndarray, label_N: np.ndarray) -> float:
    """Fraction of exact matches; invalid predictions count as wrong."""
    return float(np.mean(pred_N == label_N)) if label_N.size else 0.0


def confusion_matrix(pred_N: np.ndarray, label_N: np.ndarray, grades: Sequence[int]) -> np.ndarray:
    """Counts [G, G + 1]: rows the true grade, columns the predicted grade, then 'invalid'."""
    g = np.asarray(grades)
    row = np.searchsorted(g, label_N)
    col = np.where(pred_N == INVALID, len(g), np.searchsorted(g, pred_N))
    out = np.zeros((len(g), len(g) + 1), dtype=np.int64)
    np.add.at(out, (row, col), 1)
    return out


def precision_recall_f1(confusion_GC: np.ndarray):
    """Per-grade precision, recall, F1 and support from a [G, G + 1] confusion matrix (0/0 = 0)."""
    num = len(confusion_GC)
    tp = np.diag(confusion_GC[:, :num]).astype(np.float64)
    predicted = confusion_GC[:, :num].sum(axis=0)
    support = confusion_GC.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(num), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(num), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(num), where=denom > 0)
    return precision, recall, f1, support


def mean_absolute_error(pred_N: np.ndarray, label_N: np.ndarray) -> float | None:
    """Mean |prediction - label| over valid predictions; None when there are none."""
    valid = pred_N != INVALID
    if not valid.any():
        return None
    return float(np.mean(np.abs(pred_N[valid] - label_N[valid])))


# ---- ranking ------------------------------------------------------------------------------------
def expected_grade(grade_probs_NG: np.ndarray, grades: Sequence[int]) -> np.ndarray:
    """Expected grade [N] under each row's (normalised) distribution; rows with no mass get
    min grade - 1, below every grade."""
    p = np.asarray(grade_probs_NG, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(grades):
        raise ValueError(f"grade_probs must be [N, {len(grades)}], got {p.shape}")
    if (p < 0).any() or not np.isfinite(p).all():
        raise ValueError("grade_probs must be finite and non-negative")
    mass = p.sum(axis=1)
    weighted = p @ np.asarray(grades, dtype=np.float64)
    return np.where(mass > 0, weighted / np.where(mass > 0, mass, 1.0), min(grades) - 1.0)


def gains_from_labels(label_N: np.ndarray, grades: Sequence[int], gain: str = "exponential"):
    """Gain [N] of each document: 2**rel - 1 or rel, with rel = label - min grade."""
    if gain not in GAINS:
        raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")
    rel = (np.asarray(label_N) - min(grades)).astype(np.float64)
    return np.exp2(rel) - 1.0 if gain == "exponential" else rel


def dcg_at_k(score_D: np.ndarray, gain_D: np.ndarray, k: int) -> float:
    """DCG@k of one query's D documents ranked by score, ties sharing their discounts."""
    order = np.argsort(-score_D, kind="stable")
    score, gain = score_D[order], gain_D[order]
    disc = np.zeros(len(score))
    top = min(k, len(score))
    disc[:top] = 1.0 / np.log2(np.arange(2, top + 2))
    cum = np.concatenate([[0.0], np.cumsum(disc)])
    _, start, count = np.unique(-score, return_index=True, return_counts=True)
    total = 0.0
    for s, c in zip(start, count, strict=True):
        total += gain[s : s + c].mean() * (cum[s + c] - cum[s])
    return float(total)


def ndcg_per_query(score_N, gain_N, qids: Sequence[Any], k: int = 10):
    """NDCG@k of each query; returns (dict qid -> ndcg, skipped_no_gain, skipped_single_doc)."""
    score_N, gain_N = np.asarray(score_N, np.float64), np.asarray(gain_N, np.float64)
    keys = np.asarray([str(q) for q in qids])
    if not (len(keys) == len(score_N) == len(gain_N)):
        raise ValueError("qids, scores and gains must have the same length")
    out: dict[str, float] = {}
    no_gain = single = 0
    uniq, inverse = np.unique(keys, return_inverse=True)
    for i, q in enumerate(uniq):
        idx = np.flatnonzero(inverse == i)
        if len(idx) < 2:
            single += 1
            continue
        ideal = dcg_at_k(gain_N[idx], gain_N[idx], k)
        if ideal <= 0:
            no_gain += 1
            continue
        out[str(q)] = dcg_at_k(score_N[idx], gain_N[idx], k) / ideal
    return out, no_gain, single


# ---- reasoning steps ----------------------------------------------------------------------------
def step_metrics(step_verdicts_NP: np.ndarray) -> dict[str, Any]:
    """Step accuracy (pooled and per position) and the all-steps-right rate; see module doc."""
    v = np.asarray(step_verdicts_NP)
    if v.ndim != 2:
        raise ValueError(f"step verdicts must be [N, P], got shape {v.shape}")
    if not np.isin(v, (-1, 0, 1)).all():
        raise ValueError("step verdicts must be 1 (correct), 0 (wrong) or -1 (unverifiable)")
    correct, wrong = (v == 1), (v == 0)
    verified = correct | wrong
    n_ver = verified.sum(axis=0)
    per_step = [
        float(c / n) if n else None for c, n in zip(correct.sum(axis=0), n_ver, strict=True)
    ]
    all_right = (~wrong.any(axis=1)) & verified.any(axis=1)
    return {
        "step_accuracy": float(correct.sum() / verified.sum()) if verified.any() else None,
        "step_accuracy_per_step": per_step,
        "steps_verified": int(verified.sum()),
        "all_steps_right": float(all_right.mean()) if len(v) else None,
    }


# ---- the report ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    """All metrics of one system on one split. Undefined values are None (null in JSON).

    per_grade: one dict per grade {grade, precision, recall, f1, support}, lowest grade first.
    confusion: [G][G + 1] counts, rows true grades, columns predicted grades then 'invalid'.
    ndcg_per_query: qid -> NDCG@k for the queries that were scored.
    """

    grades: list[int]
    num_examples: int
    accuracy: float
    macro_f1: float
    per_grade: list[dict[str, Any]]
    confusion: list[list[int]]
    mean_abs_error: float | None
    invalid_rate: float
    ndcg_k: int = 10
    ndcg_gain: str = "exponential"
    ndcg: float | None = None
    ndcg_per_query: dict[str, float] = dataclasses.field(default_factory=dict)
    ndcg_skipped_no_gain: int = 0
    ndcg_skipped_single_doc: int = 0
    step_accuracy: float | None = None
    step_accuracy_per_step: list[float | None] | None = None
    steps_verified: int = 0
    all_steps_right: float | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)
        path.write_text(text + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Report:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def summary(self) -> dict[str, float | None]:
        """The headline numbers (for logs and tables)."""
        keys = ("accuracy", "macro_f1", "mean_abs_error", "invalid_rate", "ndcg")
        out = {k: getattr(self, k) for k in keys}
        out.update(step_accuracy=self.step_accuracy, all_steps_right=self.all_steps_right)
        return out


def evaluate(
    predictions: Sequence[int | None] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    grades: Sequence[int],
    *,
    qids: Sequence[Any] | None = None,
    grade_probs: np.ndarray | None = None,
    step_verdicts: np.ndarray | None = None,
    k: int = 10,
    gain: str = "exponential",
    meta: Mapping[str, Any] | None = None,
) -> Report:
    """Every metric of the module docstring as a Report.

    predictions: [N] grades, None / INVALID for invalid outputs. labels: [N] human grades.
    grades: the scale's grades, ascending. qids: [N] query ids (enables NDCG@k).
    grade_probs: [N, G] grade distributions in the order of `grades` (ranking scores for NDCG;
    without them the predicted grade is used). step_verdicts: [N, P] in {1, 0, -1}.
    """
    grades = _grades(grades)
    label_N = _labels(labels, grades)
    pred_N = as_predictions(predictions, grades)
    if len(pred_N) != len(label_N):
        raise ValueError(f"{len(pred_N)} predictions but {len(label_N)} labels")
    conf = confusion_matrix(pred_N, label_N, grades)
    precision, recall, f1, support = precision_recall_f1(conf)
    report = Report(
        grades=list(grades),
        num_examples=len(label_N),
        accuracy=accuracy(pred_N, label_N),
        macro_f1=float(f1.mean()),
        per_grade=[
            dict(grade=g, precision=float(p), recall=float(r), f1=float(f), support=int(s))
            for g, p, r, f, s in zip(grades, precision, recall, f1, support, strict=True)
        ],
        confusion=conf.tolist(),
        mean_abs_error=mean_absolute_error(pred_N, label_N),
        invalid_rate=float(np.mean(pred_N == INVALID)) if len(pred_N) else 0.0,
        ndcg_k=k,
        ndcg_gain=gain,
        meta=dict(meta or {}),
    )
    if grade_probs is not None and qids is None:
        raise ValueError("grade_probs only rank documents within queries: pass qids as well")
    if qids is not None:
        if grade_probs is not None:
            score = expected_grade(grade_probs, grades)
            if len(score) != len(label_N):
                raise ValueError(f"grade_probs has {len(score)} rows for {len(label_N)} labels")
        else:
            score = np.where(pred_N == INVALID, min(grades) - 1, pred_N).astype(np.float64)
        per_q, no_gain, single = ndcg_per_query(
            score, gains_from_labels(label_N, grades, gain), qids, k
        )
        report.ndcg = float(np.mean(list(per_q.values()))) if per_q else None
        report.ndcg_per_query = per_q
        report.ndcg_skipped_no_gain, report.ndcg_skipped_single_doc = no_gain, single
    if step_verdicts is not None:
        if len(np.asarray(step_verdicts)) != len(label_N):
            raise ValueError("step_verdicts must have one row per example")
        for key, value in step_metrics(step_verdicts).items():
            setattr(report, key, value)
    return report


# ---- plots (Agg canvas, no pyplot state) ---------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_confusion(report: Report, path: str | os.PathLike, title: str | None = None) -> None:
    """Write a PNG: colour = row-normalised share, text = counts; axes labelled with grades."""
    conf = np.asarray(report.confusion, dtype=np.float64)
    rows = conf.sum(axis=1, keepdims=True)
    share = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    names = [str(g) for g in report.grades]
    fig = _figure(1.2 + 0.8 * conf.shape[1], 1.0 + 0.8 * conf.shape[0])
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true grade's row")
    for (i, j), count in np.ndenumerate(conf):
        colour = "white" if share[i, j] > 0.5 else "black"
        ax.text(j, i, f"{int(count)}", ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(conf.shape[1]), names + ["invalid"])
    ax.set_yticks(range(conf.shape[0]), names)
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.set_title(title or f"accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}")
    fig.tight_layout()
    _save(fig, path)


def plot_per_grade_f1(reports: Mapping[str, Report], path: str | os.PathLike) -> None:
    """Write a PNG of grouped bars: per-grade F1 of each system (legend shows macro-F1)."""
    if not reports:
        raise ValueError("no reports to plot")
    grades = next(iter(reports.values())).grades
    if any(r.grades != grades for r in reports.values()):
        raise ValueError("all reports must use the same grades")
    width = 0.8 / len(reports)
    fig = _figure(2.0 + 0.6 * len(grades) * max(1, len(reports) / 2), 3.5)
    ax = fig.add_subplot()
    x = np.arange(len(grades))
    for i, (name, report) in enumerate(reports.items()):
        f1 = [row["f1"] for row in report.per_grade]
        label = f"{name} (macro-F1 {report.macro_f1:.3f})"
        ax.bar(x - 0.4 + width * (i + 0.5), f1, width, label=label)
    ax.set_xticks(x, [str(g) for g in grades])
    ax.set_xlabel("grade")
    ax.set_ylabel("F1")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
