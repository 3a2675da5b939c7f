"""CrowdFlower Search Results Relevance (Kaggle 2015), the labelled train set in 10 folds."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from jaxgrm.data.builders.base import (
    BadRow,
    Reason,
    RelevanceBuilder,
    Row,
    clean_text,
    get_field,
    id_field,
    int_grade,
    iter_csv,
    make_qid,
    read_text,
    text_field,
)
from jaxgrm.data.schema import RelevanceExample

FOLD = re.compile(r"train_fold(\d+)\.csv")
LONG_QUERY_CHARS = 22


class _TextOnly(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        self._hidden += tag in ("script", "style")
        self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._hidden:
            self._hidden -= 1
        self.parts.append(" ")

    def handle_data(self, data):
        if not self._hidden:
            self.parts.append(data)


def strip_html(s: str) -> str:
    """Text content of HTML-ish text (tags dropped, entities decoded), whitespace collapsed."""
    if "<" not in s and "&" not in s:
        return clean_text(s)
    parser = _TextOnly()
    parser.feed(s)
    parser.close()
    return clean_text("".join(parser.parts))


class CrowdFlower(RelevanceBuilder):
    """CrowdFlower search results relevance: e-commerce queries against product listings.

    Input (manual dir): `train_fold{1..10}.csv` (all `train_fold*.csv` found are read; together
    the ten hold Kaggle's 10,158 labelled rows), UTF-8 CSV with
    `id, query, product_title, product_description, median_relevance, relevance_variance`.
    Record: doc = product_title, a newline, then the description with HTML tags dropped and
    entities decoded (the title alone when the description is empty); whitespace collapsed.
    label = median_relevance, scale `crowdflower4` (1-4). meta: id, fold, relevance_variance
    (rater variance, for flagging noisy labels). `id` must be unique within a file.
    Longtail: every query has 8 or more pairs (the competition sampled products per query), so
    query frequency says nothing here; long, specific queries are the rare ones in a search log,
    so longtail = queries of at least 22 characters after normalisation (37 of 261 queries,
    about 1,200 pairs).
    Splits: the other queries 80/10/10 by salted hash of the qid.
    """

    name = "crowdflower"
    SCALE = "crowdflower4"
    LONGTAIL_RULE = f"queries of at least {LONG_QUERY_CHARS} characters (normalised)"
    ROW_ID_FIELD = "id"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the ten `train_fold{i}.csv` files in the manual dir, e.g. "
        "../shared/data/crowdflower-search-relevance."
    )

    def _rows(self, manual_dir: Path) -> Iterator[Row | BadRow]:
        folds = sorted(
            (int(m.group(1)), p)
            for p in manual_dir.iterdir()
            if (m := FOLD.fullmatch(p.name)) and p.is_file()
        )
        if not folds:
            raise FileNotFoundError(f"{manual_dir}: no train_fold*.csv files")
        for _, path in folds:
            yield from iter_csv(read_text(path), path.name)

    def _example(self, row: Row) -> RelevanceExample:
        query = text_field(row, "query", Reason.EMPTY_QUERY)
        title = text_field(row, "product_title", Reason.EMPTY_DOC)
        description = strip_html(text_field(row, "product_description"))
        label = int_grade(row, "median_relevance", self.grade_scale)
        raw = get_field(row, "relevance_variance")
        try:
            variance = float(raw)
        except (TypeError, ValueError):
            variance = math.nan
        if not (math.isfinite(variance) and variance >= 0):
            raise BadRow(Reason.BAD_VALUE, "relevance_variance", "a number >= 0", raw)
        return RelevanceExample(
            qid=make_qid(self.source, query),
            query=query,
            doc=f"{title}\n{description}" if description else title,
            label=label,
            scale=self.SCALE,
            source=self.source,
            meta={
                "id": id_field(row, "id"),
                "fold": int(FOLD.fullmatch(row.file).group(1)),
                "relevance_variance": variance,
            },
        )

    def _is_longtail(self, key: str, n_pairs: int) -> bool:
        return len(key) >= LONG_QUERY_CHARS
