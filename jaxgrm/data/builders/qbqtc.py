"""QBQTC: QQ Browser query-title corpus (Chinese web search), 3 grades."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from jaxgrm.data.builders.base import (
    BadRow,
    Reason,
    RelevanceBuilder,
    Row,
    id_field,
    int_grade,
    iter_jsonl,
    make_qid,
    require_files,
    text_field,
)
from jaxgrm.data.schema import RelevanceExample

DEV, TEST_PUBLIC = "dev.json", "test_public.json"
LONG_QUERY_CHARS = 20


class Qbqtc(RelevanceBuilder):
    """QBQTC: QQ Browser search queries against web page titles (with site names), in Chinese.

    Input (manual dir): `dev.json` (20,000 labelled pairs) and, when present,
    `test_public.json` (5,000 more; absent from the shared snapshot), JSON lines of
    `{id, query, title, label}` with the label a string "0".."2". `test.json` has no labels and
    is not read. The two files share queries; pooling them under one qid per query puts a
    shared query in one split. Record: doc = title, label on `qbqtc3`; meta: id, file.
    `id` must be unique within a file; titles carry no id, so repeated text is kept.
    Longtail: 94% of queries occur once, so frequency cannot pick a rare slice; long queries
    are the tail of a search log (and here lean to grade 0), so longtail = queries of at least
    20 characters after normalisation (about 1,000 queries, 1,100 pairs of dev.json).
    Splits: the other queries 80/10/10 by salted hash of the qid.
    """

    name = "qbqtc"
    SCALE = "qbqtc3"
    LONGTAIL_RULE = f"queries of at least {LONG_QUERY_CHARS} characters (normalised)"
    ROW_ID_FIELD = "id"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put QBQTC's dev.json (and test_public.json if you have it) in the manual dir, e.g. "
        "../shared/data/qbqtc."
    )

    def _rows(self, manual_dir: Path) -> Iterator[Row | BadRow]:
        paths = require_files(manual_dir, [DEV])
        if (manual_dir / TEST_PUBLIC).is_file():
            paths.append(manual_dir / TEST_PUBLIC)
        for path in paths:
            yield from iter_jsonl(path, path.name)

    def _example(self, row: Row) -> RelevanceExample:
        query = text_field(row, "query", Reason.EMPTY_QUERY)
        doc = text_field(row, "title", Reason.EMPTY_DOC)
        label = int_grade(row, "label", self.grade_scale)
        return RelevanceExample(
            qid=make_qid(self.source, query),
            query=query,
            doc=doc,
            label=label,
            scale=self.SCALE,
            source=self.source,
            meta={"id": id_field(row, "id"), "file": row.file.removesuffix(".json")},
        )

    def _is_longtail(self, key: str, n_pairs: int) -> bool:
        return len(key) >= LONG_QUERY_CHARS
