"""The record every data source becomes, the grade scales, and the step-conclusion contract.

`RelevanceExample` is the one record type: builders write it, prompts render it, rewards check
traces against it, evaluation groups by its `qid`. Its JSONL form (`to_json` / `from_json`) is
how users bring their own data.

Step conclusions (OURS, see method.md). Every reasoning step ends with one machine-checkable
conclusion line

    => key: value; key: value

whose keys depend on the step. A step verifier compares the claimed values with what is known:

    step1  query analysis   subject, constraints, intent
    step2  note analysis    subject, covers, format          (synthetic world: truth recorded)
                            present, absent                  (real data: checked by string match)
    step3  criteria check   rule, bound

List values (constraints, covers, present, absent) are comma-separated, `none` when empty, and
compared as sets. `bound` is a comparison with a grade, e.g. `<= 1`, `= 3`, `>= 2`, checked
against the human grade. Values compare case-insensitively after collapsing whitespace.
`RelevanceExample.steps` records the true conclusions where the source knows them (the synthetic
world): {"step1": {"subject": ..., ...}, "step2": {...}, "step3": {...}}.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

STEP_NAMES = ("step1", "step2", "step3")
CONCLUSION_MARK = "=>"
LIST_KEYS = frozenset({"constraints", "covers", "present", "absent"})
STEP_KEYS = {
    "step1": ("subject", "constraints", "intent"),
    "step2": ("subject", "covers", "format", "present", "absent"),
    "step3": ("rule", "bound"),
}


@dataclasses.dataclass(frozen=True)
class GradeScale:
    """A source's native grade scale: the grades, lowest first, and the rubric line of each."""

    name: str
    grades: tuple[int, ...]
    rubric: Mapping[int, str]

    def __post_init__(self):
        if tuple(sorted(self.grades)) != self.grades or set(self.rubric) != set(self.grades):
            raise ValueError(f"scale {self.name}: grades must be sorted and each have a rubric")

    def __contains__(self, grade: int) -> bool:
        return grade in self.grades


SCALES: dict[str, GradeScale] = {
    s.name: s
    for s in (
        GradeScale(
            "xhs5",
            (-1, 0, 1, 2, 3),
            {
                -1: "spam, ad or harmful: the note must not be shown",
                0: "irrelevant: a different subject or need",
                1: "weakly relevant: related, but misses the core need or only mentions it",
                2: "relevant: the right subject, one constraint or the intent not met",
                3: "highly relevant: the subject, constraints and intent all met",
            },
        ),
        GradeScale(
            "homedepot3",
            (1, 2, 3),
            {1: "not relevant", 2: "somewhat relevant", 3: "highly relevant"},
        ),
        GradeScale(
            "crowdflower4",
            (1, 2, 3, 4),
            {
                1: "irrelevant to the query",
                2: "somewhat relevant",
                3: "mostly relevant",
                4: "fully satisfies the query",
            },
        ),
        GradeScale(
            "trec4",
            (0, 1, 2, 3),
            {
                0: "irrelevant: nothing to do with the query",
                1: "related: on topic but does not answer the query",
                2: "highly relevant: some answer, possibly unclear or partial",
                3: "perfectly relevant: dedicated to the query, contains the exact answer",
            },
        ),
        GradeScale(
            "kuake4",
            (0, 1, 2, 3),
            {
                0: "no match, no reference value",
                1: "little match, some reference value",
                2: "partial match: topic broader or narrower than the query",
                3: "full match: the title's topic is the query's",
            },
        ),
        GradeScale(
            "qbqtc3",
            (0, 1, 2),
            {0: "poorly relevant", 1: "somewhat relevant", 2: "very relevant"},
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class RelevanceExample:
    """One graded query-document pair.

    qid: query id (same query text within a source -> same qid). query, doc: non-empty text.
    label: grade on the native scale `scale` (a key of SCALES). source: data set name.
    doc_title: optional title (notes and products have one). steps: true step conclusions where
    known (see the module docstring), else None. meta: anything else, JSON-serialisable.
    """

    qid: str
    query: str
    doc: str
    label: int
    scale: str
    source: str
    doc_title: str = ""
    steps: Mapping[str, Mapping[str, str]] | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; expected one of {sorted(SCALES)}")
        if self.label not in SCALES[self.scale]:
            raise ValueError(
                f"label {self.label} is not on scale {self.scale} {SCALES[self.scale].grades}"
            )
        for name in ("qid", "query", "doc"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"field {name!r} is empty")
        if self.steps is not None and set(self.steps) - set(STEP_NAMES):
            raise ValueError(f"unknown steps {sorted(set(self.steps) - set(STEP_NAMES))}")

    @property
    def grade_scale(self) -> GradeScale:
        return SCALES[self.scale]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RelevanceExample:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; expected a subset of {fields}")
        return cls(**d)

    @classmethod
    def from_json(cls, line: str) -> RelevanceExample:
        return cls.from_dict(json.loads(line))


# ---- the TFDS form of a record ------------------------------------------------------------------
# Text fields as tfds Text, the label as int32, `steps` and `meta` as JSON text (their keys vary by
# source). Every builder uses these three functions, so every data set reads back the same way.
def tfds_features():
    """The `tfds.features.FeaturesDict` of a RelevanceExample."""
    import numpy as np
    import tensorflow_datasets as tfds

    text = tfds.features.Text
    return tfds.features.FeaturesDict(
        {
            "qid": text(),
            "query": text(),
            "doc": text(),
            "doc_title": text(),
            "label": tfds.features.Scalar(dtype=np.int32),
            "scale": text(),
            "source": text(),
            "steps": text(),
            "meta": text(),
        }
    )


def to_tfds_record(ex: RelevanceExample) -> dict[str, Any]:
    """The dict a builder yields for `ex` (matches `tfds_features`)."""
    return {
        "qid": ex.qid,
        "query": ex.query,
        "doc": ex.doc,
        "doc_title": ex.doc_title,
        "label": int(ex.label),
        "scale": ex.scale,
        "source": ex.source,
        "steps": "" if ex.steps is None else json.dumps(ex.steps, ensure_ascii=False),
        "meta": json.dumps(dict(ex.meta), ensure_ascii=False, sort_keys=True),
    }


def from_tfds_record(record: Mapping[str, Any]) -> RelevanceExample:
    """A RelevanceExample from a record read back with `tfds.data_source` (bytes for text)."""

    def text(key: str) -> str:
        value = record[key]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    steps = text("steps")
    return RelevanceExample(
        qid=text("qid"),
        query=text("query"),
        doc=text("doc"),
        doc_title=text("doc_title"),
        label=int(record["label"]),
        scale=text("scale"),
        source=text("source"),
        steps=json.loads(steps) if steps else None,
        meta=json.loads(text("meta") or "{}"),
    )
