"""Your own graded pairs: JSON lines of RelevanceExample fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from jaxgrm.data.builders.base import (
    BadRow,
    Reason,
    RelevanceBuilder,
    Row,
    get_field,
    id_field,
    int_grade,
    iter_jsonl,
    make_qid,
    text_field,
)
from jaxgrm.data.schema import SCALES, STEP_NAMES, RelevanceExample

FIELDS = ("qid", "query", "doc", "label", "scale", "source", "doc_title", "steps", "meta")
REQUIRED = ("query", "doc", "label", "scale")


@dataclasses.dataclass(eq=False)
class JsonlConfig(tfds.core.BuilderConfig):
    """A user data set: `name` names it (and is the default `source`); `path` is a `.jsonl`
    file or a directory of them (every `*.jsonl` in it, sorted); None reads the manual dir."""

    path: str | None = None


class Jsonl(RelevanceBuilder):
    """Graded pairs you bring: one JSON object per line, the fields of RelevanceExample.

    Required: `query`, `doc` (non-empty text), `scale` (a name in SCALES), `label` (an integer
    on that scale; an integer string is accepted). Optional: `qid` (text or integer; derived
    from the query text when absent, so the same query shares a qid), `source` (defaults to
    the config name), `doc_title`, `steps` ({"step1": {...}, ...}), `meta` (an object; a
    `meta.doc_id` names the document). Other fields are bad rows (`bad_value`).
    Input: the config's `path` (a `.jsonl` file, or every `*.jsonl` in a directory), else the
    manual dir's `*.jsonl`. Configs are made at run time, one per data set
    (`config=JsonlConfig(name="mydata", path=...)`, prepared under `jsonl/mydata/<version>`);
    without one the data set is `jsonl/<version>` with source "jsonl". Blank lines are
    ignored. A repeated (qid, meta.doc_id), or (qid, doc text) when there is no doc_id, is a
    `duplicate_id` bad row.
    Longtail: queries with one pair in the data. Splits: the other queries 80/10/10 by salted
    hash of the qid.
    """

    name = "jsonl"
    LONGTAIL_RULE = "queries with one pair in the data"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put your .jsonl files in the manual dir (or give a file or folder as the config's path)."
    )

    @property
    def source(self) -> str:
        return self.builder_config.name if self.builder_config else self.name

    def _input_dir(self, dl_manager) -> Path:
        path = getattr(self.builder_config, "path", None)
        return Path(path) if path else Path(dl_manager.manual_dir)

    def _rows(self, manual_dir: Path) -> Iterator[Row | BadRow]:
        if manual_dir.is_file():
            yield from iter_jsonl(manual_dir, manual_dir.name)
            return
        paths = sorted(p for p in manual_dir.glob("*.jsonl") if p.is_file())
        if not paths:
            raise FileNotFoundError(f"{manual_dir}: no .jsonl files")
        for path in paths:
            yield from iter_jsonl(path, path.name)

    def _example(self, row: Row) -> RelevanceExample:
        for name in row.fields:
            if name not in FIELDS:
                raise BadRow(Reason.BAD_VALUE, name, f"only the fields {', '.join(FIELDS)}", name)
        for name in REQUIRED:
            get_field(row, name)
        query = text_field(row, "query", Reason.EMPTY_QUERY)
        doc = text_field(row, "doc", Reason.EMPTY_DOC)
        scale = row.fields["scale"]
        if not isinstance(scale, str) or scale not in SCALES:
            raise BadRow(Reason.BAD_VALUE, "scale", f"one of {', '.join(SCALES)}", scale)
        label = int_grade(row, "label", SCALES[scale])
        source = text_field(row, "source") if row.fields.get("source") is not None else ""
        source = source or self.source
        qid = id_field(row, "qid") if row.fields.get("qid") is not None else None
        meta = row.fields.get("meta") or {}
        if not isinstance(meta, dict):
            raise BadRow(Reason.BAD_VALUE, "meta", "a JSON object", meta)
        steps = row.fields.get("steps")
        if steps is not None and not (
            isinstance(steps, dict)
            and set(steps) <= set(STEP_NAMES)
            and all(isinstance(v, dict) for v in steps.values())
        ):
            raise BadRow(Reason.BAD_VALUE, "steps", f"an object keyed by {STEP_NAMES}", steps)
        doc_title = ""
        if row.fields.get("doc_title") is not None:
            doc_title = text_field(row, "doc_title")
        return RelevanceExample(
            qid=qid or make_qid(source, query),
            query=query,
            doc=doc,
            label=label,
            scale=scale,
            source=source,
            doc_title=doc_title,
            steps=steps,
            meta=meta,
        )

    def _doc_id(self, row: Row, example: RelevanceExample) -> str | None:
        doc_id = example.meta.get("doc_id")
        return str(doc_id) if doc_id is not None else example.doc

    def _is_longtail(self, key: str, n_pairs: int) -> bool:
        return n_pairs == 1
