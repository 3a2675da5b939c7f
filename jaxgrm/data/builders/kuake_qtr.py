"""KUAKE-QTR (CBLUE): Chinese medical search, query against page title, 4 grades."""

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
    iter_json_array,
    make_qid,
    require_files,
    text_field,
)
from jaxgrm.data.schema import RelevanceExample

FILES = {"train": "KUAKE-QTR_train.json", "dev": "KUAKE-QTR_dev.json"}


class KuakeQtr(RelevanceBuilder):
    """KUAKE-QTR: Quark medical search queries against (truncated) page titles, in Chinese.

    Input (manual dir): `KUAKE-QTR_train.json` and `KUAKE-QTR_dev.json`, each a JSON array of
    `{id, query, title, label}` with the label a string "0".."3". `KUAKE-QTR_test.json` has no
    labels and is not read. Train and dev are pooled and re-split by query, because 2,201 of
    the 2,369 dev queries also occur in train. Record: doc = title, label on `kuake4`;
    meta: id, file ("train" or "dev"). `id` must be unique within a file (both files number
    their rows from s1). The titles carry no id, so repeated (query, title) text is kept.
    Longtail: queries that occur once in train + dev (about 1,200 queries, one pair each).
    Splits: the other queries 80/10/10 by salted hash of the qid.
    """

    name = "kuake_qtr"
    SCALE = "kuake4"
    LONGTAIL_RULE = "queries that occur once in train + dev"
    ROW_ID_FIELD = "id"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put KUAKE-QTR_{train,dev}.json (CBLUE) in the manual dir, e.g. ../shared/data/kuake-qtr."
    )

    def _rows(self, manual_dir: Path) -> Iterator[Row | BadRow]:
        for path in require_files(manual_dir, FILES.values()):
            yield from iter_json_array(path, path.name)

    def _example(self, row: Row) -> RelevanceExample:
        query = text_field(row, "query", Reason.EMPTY_QUERY)
        doc = text_field(row, "title", Reason.EMPTY_DOC)
        label = int_grade(row, "label", self.grade_scale)
        part = next(k for k, v in FILES.items() if v == row.file)
        return RelevanceExample(
            qid=make_qid(self.source, query),
            query=query,
            doc=doc,
            label=label,
            scale=self.SCALE,
            source=self.source,
            meta={"id": id_field(row, "id"), "file": part},
        )

    def _is_longtail(self, key: str, n_pairs: int) -> bool:
        return n_pairs == 1
