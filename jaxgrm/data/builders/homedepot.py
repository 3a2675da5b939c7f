"""Home Depot Product Search Relevance (Kaggle 2016), the labelled train set."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

from jaxgrm.data.builders.base import (
    BadRow,
    Reason,
    RelevanceBuilder,
    Row,
    id_field,
    iter_csv,
    make_qid,
    mean_grade,
    text_field,
)
from jaxgrm.data.schema import RelevanceExample

ZIP_NAME, CSV_NAME = "train.csv.zip", "train.csv"


class HomeDepot(RelevanceBuilder):
    """Home Depot product search relevance: homedepot.com queries against product titles.

    Input (manual dir): `train.csv.zip` (the Kaggle archive) or an extracted `train.csv`;
    latin-1 text with `id, product_uid, product_title, search_term, relevance`.
    Record: query = search_term, doc = product_title (the only product text in the snapshot),
    scale `homedepot3`. `relevance` is the mean of >= 3 raters on 1-3; the label is the nearest
    grade, and the 24 rows exactly halfway (1.5, 2.5) go to 2 ("somewhat relevant"; this is
    Python/NumPy round-half-to-even, the rounding of the source README's counts). The raw mean
    stays in meta["relevance_mean"], with meta["id"] and meta["product_uid"].
    Duplicates: `id` must be unique; so must (qid, product_uid). The full file has 5 such pairs
    (search terms differing only in a double space, e.g. "fence  mesh" / "fence mesh", for the
    same product), so a full build needs `on_bad_row="skip"`.
    Longtail: queries that occur once in the file (1,399 queries, one pair each).
    Splits: the other queries 80/10/10 by salted hash of the qid.
    """

    name = "homedepot"
    SCALE = "homedepot3"
    LONGTAIL_RULE = "queries that occur once in train.csv"
    ROW_ID_FIELD = "id"
    DOC_ID_FIELD = "product_uid"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put Kaggle's home-depot-product-search-relevance `train.csv.zip` (or `train.csv`) in "
        "the manual dir, e.g. ../shared/data/homedepot-search-relevance."
    )

    def _rows(self, manual_dir: Path) -> Iterator[Row | BadRow]:
        if (manual_dir / CSV_NAME).is_file():
            data, file = (manual_dir / CSV_NAME).read_bytes(), CSV_NAME
        elif (manual_dir / ZIP_NAME).is_file():
            with zipfile.ZipFile(manual_dir / ZIP_NAME) as z:
                data, file = z.read(CSV_NAME), f"{ZIP_NAME}/{CSV_NAME}"
        else:
            raise FileNotFoundError(f"{manual_dir}: missing {ZIP_NAME} (or {CSV_NAME})")
        yield from iter_csv(data.decode("latin-1"), file)

    def _example(self, row: Row) -> RelevanceExample:
        query = text_field(row, "search_term", Reason.EMPTY_QUERY)
        doc = text_field(row, "product_title", Reason.EMPTY_DOC)
        mean = mean_grade(row, "relevance", self.grade_scale)
        return RelevanceExample(
            qid=make_qid(self.source, query),
            query=query,
            doc=doc,
            label=round(mean),
            scale=self.SCALE,
            source=self.source,
            meta={
                "id": id_field(row, "id"),
                "product_uid": id_field(row, "product_uid"),
                "relevance_mean": mean,
            },
        )

    def _is_longtail(self, key: str, n_pairs: int) -> bool:
        return n_pairs == 1
