"""What every relevance builder shares: qids, query-disjoint splits, the bad-row policy, readers.

A builder reads raw rows, turns each into a `RelevanceExample` (or a `BadRow`), checks ids for
duplicates, then assigns whole queries to splits:

    qid        "<source>:" + the first 16 hex digits of sha256(normalised query text), so the
               same query shares a qid across a source's files. Normalised = NFKC, casefolded,
               whitespace collapsed. (The JSONL builder keeps a qid the user gives.)
    longtail   queries picked by the source's rare-query rule (`_is_longtail`, documented per set)
    train / validation / test
               the other queries sorted by sha256(SPLIT_SALT + qid), cut 80 / 10 / 10 (>= 1
               query each in validation and test): deterministic, independent of row and file
               order, exact even for 150 queries (a threshold on the hash gave TREC DL a
               3-query test split). New queries in a source can move one at a cut.

Bad rows (missing field, unparseable or out-of-scale grade, empty query or document, invalid
UTF-8, duplicate id, ...) raise `BadRow` with file, line, field and what was expected, or with
`on_bad_row="skip"` are skipped and counted per reason. The counts go into the dataset info
(`info.metadata["build_report"]`) and into `build_report.json` in the dataset's directory;
rows_read == rows_written + sum(skipped) always.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import hashlib
import io
import json
import math
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from jaxgrm.data.schema import SCALES, GradeScale, RelevanceExample, tfds_features, to_tfds_record

SPLITS = ("train", "validation", "test", "longtail")
SPLIT_SALT = "jaxgrm-split-v1"
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
REPORT_FILE = "build_report.json"
MAX_EXAMPLES_PER_REASON = 5


class OnBadRow(enum.StrEnum):
    RAISE = "raise"
    SKIP = "skip"


class Reason(enum.StrEnum):
    """Why a row was rejected; the keys of the skipped-row counts."""

    MISSING_FIELD = "missing_field"
    UNPARSEABLE_GRADE = "unparseable_grade"
    OUT_OF_SCALE = "out_of_scale_grade"
    EMPTY_QUERY = "empty_query"
    EMPTY_DOC = "empty_doc"
    INVALID_UTF8 = "invalid_utf8"
    DUPLICATE_ID = "duplicate_id"
    MALFORMED_ROW = "malformed_row"  # not a record at all: bad JSON line, too many CSV columns
    BAD_VALUE = "bad_value"  # a field of the wrong type or an unknown one (JSONL), bad variance
    QRELS_MISMATCH = "qrels_mismatch"  # TREC DL: the pair is not in the qrels, or another grade


_NOTHING = object()


class BadRow(ValueError):
    """A malformed input row: `file:line: field 'f': expected ..., got ...`."""

    def __init__(self, reason: Reason, field: str | None, expected: str, got: Any = _NOTHING):
        self.reason = Reason(reason)
        self.field = field
        self.expected = expected
        self.got = got
        self.file: str | None = None
        self.line: int | None = None
        super().__init__()

    def at(self, file: str, line: int) -> BadRow:
        if self.file is None:
            self.file, self.line = file, line
        return self

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.file is not None else ""
        field = f"field '{self.field}': " if self.field else ""
        got = "" if self.got is _NOTHING else f", got {_show(self.got)}"
        return f"{where}{field}expected {self.expected}{got}"


def _show(value: Any, limit: int = 60) -> str:
    if isinstance(value, str) and not _is_utf8(value):  # show the raw bytes
        try:
            value = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate escaped in JSON (\ud800), not a raw byte
            value = value.encode("utf-8", "backslashreplace")
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---- text, qids and splits ----------------------------------------------------------------------
def clean_text(s: str) -> str:
    """Strip and collapse whitespace (any Unicode whitespace, newlines included)."""
    return " ".join(s.split())


def query_key(query: str) -> str:
    """The normalised query text that defines "the same query": NFKC, casefold, collapse."""
    return " ".join(unicodedata.normalize("NFKC", query).casefold().split())


def make_qid(source: str, query: str) -> str:
    return f"{source}:{hashlib.sha256(query_key(query).encode('utf-8')).hexdigest()[:16]}"


def split_rank(qid: str, salt: str = SPLIT_SALT) -> bytes:
    """The salted hash that orders a source's non-longtail queries before the 80/10/10 cut."""
    return hashlib.sha256(f"{salt}\x00{qid}".encode()).digest()


def split_sizes(n: int) -> dict[str, int]:
    """Queries per split for n non-longtail queries: 10% (at least 1 from n >= 3) to
    validation and to test, the rest to train."""
    small = max(1, round(n * SPLIT_FRACTIONS["test"])) if n >= 3 else 0
    return {"train": n - 2 * small, "validation": small, "test": small}


# ---- fields of a raw row ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    """One raw record: its file (relative to the manual dir), first line (1-based), fields."""

    file: str
    line: int
    fields: Mapping[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def get_field(row: Row, name: str) -> Any:
    value = row.fields.get(name)
    if value is None:
        raise BadRow(Reason.MISSING_FIELD, name, "a value (the field is missing)")
    return value


def id_field(row: Row, name: str) -> str:
    """An id (text or an integer), stripped; empty counts as missing."""
    value = get_field(row, name)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRow(Reason.BAD_VALUE, name, "an id (text or an integer)", value)
    if not str(value).strip():
        raise BadRow(Reason.MISSING_FIELD, name, "an id (the field is empty)", value)
    return str(value).strip()


def text_field(row: Row, name: str, empty: Reason | None = None) -> str:
    """A cleaned text field; `empty` is the reason to raise when it is empty after cleaning."""
    value = get_field(row, name)
    if not isinstance(value, str):
        raise BadRow(Reason.BAD_VALUE, name, "text", value)
    if not _is_utf8(value):
        raise BadRow(Reason.INVALID_UTF8, name, "valid UTF-8 text", value)
    text = clean_text(value)
    if not text and empty is not None:
        raise BadRow(empty, name, "non-empty text", value)
    return text


_INT = re.compile(r"[+-]?\d+")


def int_grade(row: Row, name: str, scale: GradeScale) -> int:
    """An integer grade (a JSON int or an integer string) on `scale`."""
    value = get_field(row, name)
    lo, hi = scale.grades[0], scale.grades[-1]
    expected = f"an integer grade in [{lo}, {hi}]"
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRow(Reason.UNPARSEABLE_GRADE, name, expected, value)
    if value not in scale:
        raise BadRow(Reason.OUT_OF_SCALE, name, expected, value)
    return value


def mean_grade(row: Row, name: str, scale: GradeScale) -> float:
    """A real-valued grade (a mean of raters) inside the range of `scale`."""
    value = get_field(row, name)
    lo, hi = scale.grades[0], scale.grades[-1]
    expected = f"a number in [{lo}, {hi}]"
    try:
        mean = float(value)
    except (TypeError, ValueError):
        raise BadRow(Reason.UNPARSEABLE_GRADE, name, expected, value) from None
    if isinstance(value, bool) or not math.isfinite(mean):
        raise BadRow(Reason.UNPARSEABLE_GRADE, name, expected, value)
    if not lo <= mean <= hi:
        raise BadRow(Reason.OUT_OF_SCALE, name, expected, value)
    return mean


# ---- readers: each yields Row, or BadRow for a record that has no fields to speak of -----------
def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A file's text; invalid UTF-8 bytes survive as lone surrogates, caught per field."""
    return path.read_bytes().decode(encoding, "surrogateescape")


def iter_csv(text: str, file: str) -> Iterator[Row | BadRow]:
    """Rows of a CSV with a header; a row's line is where it starts (fields may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:
                continue
            if len(cells) > len(header):
                yield BadRow(Reason.MALFORMED_ROW, None, f"{len(header)} columns", len(cells)).at(
                    file, line
                )
                continue
            yield Row(file, line, dict(zip(header, cells, strict=False)))
    except csv.Error as e:
        raise ValueError(f"{file}:{reader.line_num}: not a readable CSV file: {e}") from None
    except StopIteration:
        return


def iter_jsonl(path: Path, file: str) -> Iterator[Row | BadRow]:
    """Rows of a JSON-lines file (one object per non-blank line)."""
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        text = raw.decode("utf-8", "surrogateescape").strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield BadRow(Reason.MALFORMED_ROW, None, f"a JSON object ({e.msg})", text).at(
                file, lineno
            )
            continue
        if not isinstance(obj, dict):
            yield BadRow(Reason.MALFORMED_ROW, None, "a JSON object", obj).at(file, lineno)
            continue
        yield Row(file, lineno, obj)


def iter_json_array(path: Path, file: str) -> Iterator[Row | BadRow]:
    """Rows of a file holding one JSON array of objects, each with the line it starts on.

    A syntax error cannot be resynchronised inside an array, so it stops the build whatever the
    bad-row policy (a ValueError naming the line).
    """
    text, decoder = read_text(path), json.JSONDecoder()
    line, counted = 1, 0

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, what: str):
        lineno = text.count("\n", 0, i) + 1
        return ValueError(f"{file}:{lineno}: not a JSON array of objects: {what}")

    pos = skip_ws(0)
    if not text.startswith("[", pos):
        raise fail(pos, "expected '['")
    pos = skip_ws(pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        yield (
            Row(file, line, obj)
            if isinstance(obj, dict)
            else BadRow(Reason.MALFORMED_ROW, None, "a JSON object", obj).at(file, line)
        )
        pos = skip_ws(end)
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            raise fail(pos, "expected ',' or ']'")
        pos = skip_ws(pos + 1)


def require_files(root: Path, names: Iterable[str]) -> list[Path]:
    paths = [root / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: missing {', '.join(missing)}")
    return paths


# ---- the build report ---------------------------------------------------------------------------
@dataclasses.dataclass
class BuildReport:
    """Counts of one build. rows_read == rows_written + sum(skipped.values())."""

    source: str
    on_bad_row: str
    files: list[str] = dataclasses.field(default_factory=list)
    rows_read: int = 0
    rows_written: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    splits: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    longtail_rule: str = ""
    split_rule: str = ""

    def skip(self, err: BadRow) -> None:
        self.skipped[str(err.reason)] += 1
        shown = self.skipped_examples.setdefault(str(err.reason), [])
        if len(shown) < MAX_EXAMPLES_PER_REASON:
            shown.append(str(err))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skipped"] = dict(sorted(self.skipped.items()))
        d["rows_skipped"] = sum(self.skipped.values())
        return d


# ---- the builder --------------------------------------------------------------------------------
class RelevanceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders of graded query-document sets (one subclass per source).

    Subclasses set SCALE, LONGTAIL_RULE, ROW_ID_FIELD (unique within a file, or None),
    DOC_ID_FIELD (unique per qid within the source, or None) and implement `_rows`,
    `_example` and `_is_longtail`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    SCALE: str = ""
    LONGTAIL_RULE: str = ""
    ROW_ID_FIELD: str | None = None
    DOC_ID_FIELD: str | None = None

    def __init__(self, *, on_bad_row: OnBadRow | str = OnBadRow.RAISE, **kwargs):
        self.on_bad_row = OnBadRow(on_bad_row)
        self.build_report: BuildReport | None = None
        self._started = 0.0
        super().__init__(**kwargs)

    # -- subclass hooks
    @property
    def source(self) -> str:
        return self.name

    @property
    def grade_scale(self) -> GradeScale:
        return SCALES[self.SCALE]

    def _rows(self, manual_dir: Path) -> Iterator[Row | BadRow]:
        raise NotImplementedError

    def _example(self, row: Row) -> RelevanceExample:
        raise NotImplementedError

    def _is_longtail(self, key: str, n_pairs: int) -> bool:
        """Whether the query with normalised text `key` and `n_pairs` pairs is longtail."""
        raise NotImplementedError

    def _doc_id(self, row: Row, example: RelevanceExample) -> str | None:
        return None if self.DOC_ID_FIELD is None else id_field(row, self.DOC_ID_FIELD)

    def _input_dir(self, dl_manager) -> Path:
        return Path(dl_manager.manual_dir)

    # -- TFDS
    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or self.name).strip(),
            features=tfds_features(),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        self._started = time.perf_counter()
        examples, report = self.read_examples(self._input_dir(dl_manager))
        by_split = assign_splits(examples, self._is_longtail)
        report.splits = {
            s: {"pairs": len(items), "queries": len({ex.qid for _, ex in items})}
            for s, items in by_split.items()
        }
        self.build_report = report
        self.info.metadata["build_report"] = report.to_dict()
        # TFDS cannot write an empty split (possible for a tiny input); such splits are absent.
        return {s: self._generate_examples(items) for s, items in by_split.items() if items}

    def _generate_examples(self, items):
        for key, example in items:
            yield key, to_tfds_record(example)

    def _post_download_and_prepare_hook(self) -> None:
        if self.build_report is None:
            return
        report = self.build_report.to_dict()
        report["build_seconds"] = round(time.perf_counter() - self._started, 2)
        path = Path(self.data_dir) / REPORT_FILE
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    # -- reading
    def read_examples(self, root: Path) -> tuple[list[tuple[str, RelevanceExample]], BuildReport]:
        """All good rows as (key, example), in input order, and the report of the bad ones."""
        from tqdm.auto import tqdm

        report = BuildReport(
            self.source,
            str(self.on_bad_row),
            longtail_rule=self.LONGTAIL_RULE,
            split_rule=f"the other queries sorted by sha256({SPLIT_SALT!r} + qid), cut 80/10/10",
        )
        row_ids: dict[tuple[str, str], int] = {}
        doc_ids: dict[tuple[str, str], str] = {}
        out: list[tuple[str, RelevanceExample]] = []
        rows = tqdm(self._rows(root), desc=f"reading {self.name}", unit=" rows", disable=None)
        for item in rows:
            report.rows_read += 1
            if isinstance(item, Row) and item.file not in report.files:
                report.files.append(item.file)
            try:
                if isinstance(item, BadRow):
                    raise item
                example = self._example(item)
                self._check_ids(item, example, row_ids, doc_ids)
            except BadRow as err:
                if isinstance(item, Row):
                    err.at(item.file, item.line)
                if self.on_bad_row is OnBadRow.RAISE:
                    raise
                report.skip(err)
                continue
            out.append((item.where, example))
        report.rows_written = len(out)
        assert report.rows_read == report.rows_written + sum(report.skipped.values())
        return out, report

    def _check_ids(self, row: Row, example: RelevanceExample, row_ids, doc_ids) -> None:
        if self.ROW_ID_FIELD is not None:
            rid = id_field(row, self.ROW_ID_FIELD)
            first = row_ids.setdefault((row.file, rid), row.line)
            if first != row.line:
                expected = f"an id not used before in this file (it is on line {first})"
                raise BadRow(Reason.DUPLICATE_ID, self.ROW_ID_FIELD, expected, rid)
        did = self._doc_id(row, example)
        if did is not None:
            first = doc_ids.setdefault((example.qid, did), row.where)
            if first != row.where:
                field = self.DOC_ID_FIELD or "doc"
                expected = f"one row per (query, {field}) (this pair is first at {first})"
                raise BadRow(Reason.DUPLICATE_ID, field, expected, did)


def assign_splits(examples: list[tuple[str, RelevanceExample]], is_longtail) -> dict[str, list]:
    """Group (key, example) pairs by split, whole queries at a time: the longtail rule first,
    then the other qids sorted by `split_rank` and cut 80/10/10 (`split_sizes`)."""
    n_pairs = Counter(ex.qid for _, ex in examples)
    first_query: dict[str, str] = {}
    for _, ex in examples:
        first_query.setdefault(ex.qid, ex.query)
    split_of = {
        q: "longtail" for q, text in first_query.items() if is_longtail(query_key(text), n_pairs[q])
    }
    ranked = sorted((q for q in first_query if q not in split_of), key=split_rank)
    start = 0
    for split, size in split_sizes(len(ranked)).items():
        split_of.update(dict.fromkeys(ranked[start : start + size], split))
        start += size
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    for key, ex in examples:
        by_split[split_of[ex.qid]].append((key, ex))
    return by_split
