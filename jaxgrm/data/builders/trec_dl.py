"""TREC Deep Learning 2019-2021 passage track: NIST-judged pairs with passage text."""

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

JUDGED = "trec_dl_judged.jsonl"
LONG_QUERY_CHARS = 60


def qrels_file(dataset: str) -> str:
    """`trec-dl19-passage` -> `qrels.dl19-passage.txt`."""
    return f"qrels.{dataset.removeprefix('trec-')}.txt"


def read_qrels(path: Path) -> dict[tuple[str, str], int]:
    """(query id, doc id) -> grade from a TREC qrels file (`qid 0 docid grade` lines)."""
    qrels = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4 or not parts[3].lstrip("-").isdigit():
            raise ValueError(f"{path.name}:{lineno}: expected 'qid Q0 docid grade', got {line!r}")
        qrels[parts[0], parts[2]] = int(parts[3])
    return qrels


class TrecDl(RelevanceBuilder):
    """TREC DL 2019/2020/2021 passage ranking: web questions against MS MARCO passages.

    Input (manual dir): `trec_dl_judged.jsonl` (`dataset, qid, query, docid, passage, label`)
    and the qrels `qrels.dl{19,20,21}-passage.txt`. Every pair's grade is checked against the
    qrels of its `dataset`; a pair absent from them, or graded differently, is a bad row
    (`qrels_mismatch`; none in the shipped join). Record: doc = passage, label on `trec4` (0-3).
    The qid is the hash of the query text like every source; TREC's own query id stays in
    meta["trec_qid"] with meta["dataset"] and meta["docid"]. (qid, docid) must be unique.
    Longtail: the 150 queries are all distinct and each has 20+ judged passages, so frequency
    says nothing; long, specific questions are the rare ones in a search log, so longtail =
    queries of at least 60 characters after normalisation (15 queries, about 1,340 pairs).
    Splits: the other 135 queries 80/10/10 by salted hash of the qid (107 / 14 / 14 queries:
    per-query metrics are noisy at this size).
    """

    name = "trec_dl"
    SCALE = "trec4"
    LONGTAIL_RULE = f"queries of at least {LONG_QUERY_CHARS} characters (normalised)"
    DOC_ID_FIELD = "docid"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put `{JUDGED}` and `qrels.dl{{19,20,21}}-passage.txt` in the manual dir, e.g. "
        "../shared/data/trec-dl-judged-passages."
    )

    def _rows(self, manual_dir: Path) -> Iterator[Row | BadRow]:
        (judged,) = require_files(manual_dir, [JUDGED])
        self._qrels = {
            p.name: read_qrels(p) for p in sorted(manual_dir.glob("qrels.*.txt")) if p.is_file()
        }
        yield from iter_jsonl(judged, JUDGED)

    def _example(self, row: Row) -> RelevanceExample:
        dataset = text_field(row, "dataset", Reason.MISSING_FIELD)
        trec_qid = id_field(row, "qid")
        query = text_field(row, "query", Reason.EMPTY_QUERY)
        docid = id_field(row, "docid")
        doc = text_field(row, "passage", Reason.EMPTY_DOC)
        label = int_grade(row, "label", self.grade_scale)
        qrels = self._qrels.get(qrels_file(dataset))
        if qrels is None:
            expected = f"a dataset whose qrels file ({qrels_file(dataset)}) is in the manual dir"
            raise BadRow(Reason.QRELS_MISMATCH, "dataset", expected, dataset)
        judged = qrels.get((trec_qid, docid))
        if judged != label:
            expected = (
                f"the grade in {qrels_file(dataset)}, {judged}"
                if judged is not None
                else f"a pair judged in {qrels_file(dataset)}"
            )
            raise BadRow(Reason.QRELS_MISMATCH, "label", expected, label)
        return RelevanceExample(
            qid=make_qid(self.source, query),
            query=query,
            doc=doc,
            label=label,
            scale=self.SCALE,
            source=self.source,
            meta={"dataset": dataset, "trec_qid": trec_qid, "docid": docid},
        )

    def _is_longtail(self, key: str, n_pairs: int) -> bool:
        return len(key) >= LONG_QUERY_CHARS
