"""The TFDS builders: each real set on a small slice written in its own format, the split rule,
and the bad-row policy on files with planted faults."""

import csv
import io
import json
import os
import zipfile
from pathlib import Path

import pytest

from jaxgrm.data.builders import build, make_builder
from jaxgrm.data.builders.base import (
    SPLITS,
    BadRow,
    Reason,
    assign_splits,
    make_qid,
    query_key,
    split_rank,
    split_sizes,
)
from jaxgrm.data.builders.crowdflower import strip_html
from jaxgrm.data.schema import SCALES, RelevanceExample, from_tfds_record

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# Outside CI a checkout without ../shared skips these; in CI (CI=true) the data must be there.
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir() and not os.environ.get("CI"), reason="../shared/data is not here"
)


# ---- small slices of the real sets, each written in its source's format ----------------------
def _csv_head(text: str, n: int) -> str:
    rows = list(csv.reader(io.StringIO(text, newline="")))[: n + 1]
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def slice_homedepot(dst: Path, n: int = 300) -> None:
    with zipfile.ZipFile(SHARED / "homedepot-search-relevance" / "train.csv.zip") as z:
        text = z.read("train.csv").decode("latin-1")
    with zipfile.ZipFile(dst / "train.csv.zip", "w") as z:
        z.writestr("train.csv", _csv_head(text, n).encode("latin-1"))


def slice_crowdflower(dst: Path, n: int = 60) -> None:
    for fold in (1, 2):
        src = SHARED / "crowdflower-search-relevance" / f"train_fold{fold}.csv"
        (dst / src.name).write_text(_csv_head(src.read_text(encoding="utf-8"), n), "utf-8")


def slice_trec_dl(dst: Path, n: int = 300) -> None:
    src = SHARED / "trec-dl-judged-passages"
    lines = (src / "trec_dl_judged.jsonl").read_text("utf-8").splitlines()
    picked = lines[:n] + lines[-n:]  # DL19 and DL21
    (dst / "trec_dl_judged.jsonl").write_text("\n".join(picked) + "\n", "utf-8")
    for qrels in src.glob("qrels.*.txt"):
        (dst / qrels.name).write_bytes(qrels.read_bytes())


def slice_kuake_qtr(dst: Path, n: int = 300) -> None:
    for part, k in (("train", n), ("dev", n // 3)):
        name = f"KUAKE-QTR_{part}.json"
        rows = json.loads((SHARED / "kuake-qtr" / name).read_text("utf-8"))[:k]
        (dst / name).write_text(json.dumps(rows, ensure_ascii=False, indent=2), "utf-8")


def slice_qbqtc(dst: Path, n: int = 400) -> None:
    lines = (SHARED / "qbqtc" / "dev.json").read_text("utf-8").splitlines()[:n]
    (dst / "dev.json").write_text("\n".join(lines) + "\n", "utf-8")


SLICES = {
    "homedepot": (slice_homedepot, "homedepot3"),
    "crowdflower": (slice_crowdflower, "crowdflower4"),
    "trec_dl": (slice_trec_dl, "trec4"),
    "kuake_qtr": (slice_kuake_qtr, "kuake4"),
    "qbqtc": (slice_qbqtc, "qbqtc3"),
}


def read_back(name: str, data_dir: Path) -> dict[str, list[RelevanceExample]]:
    import tensorflow_datasets as tfds

    sources = tfds.data_source(name, data_dir=str(data_dir))
    return {s: [from_tfds_record(src[i]) for i in range(len(src))] for s, src in sources.items()}


@needs_shared
@pytest.mark.parametrize("name", sorted(SLICES))
def test_builder_on_a_slice_reads_back(name, tmp_path):
    write_slice, scale = SLICES[name]
    raw, data_dir = tmp_path / "raw", tmp_path / "data"
    raw.mkdir()
    write_slice(raw)
    builder = build(name, manual_dir=raw, data_dir=data_dir)
    report = builder.build_report
    assert report.rows_read == report.rows_written > 0 and not report.skipped

    splits = read_back(name, data_dir)
    assert set(splits) <= set(SPLITS) and "train" in splits
    examples = [ex for exs in splits.values() for ex in exs]
    assert len(examples) == report.rows_written
    assert {ex.scale for ex in examples} == {scale} and {ex.source for ex in examples} == {name}
    assert all(ex.label in SCALES[scale] and ex.query and ex.doc for ex in examples)
    # query-disjoint, and one qid per normalised query
    qids = {s: {ex.qid for ex in exs} for s, exs in splits.items()}
    for a in qids:
        for b in qids:
            assert a == b or not qids[a] & qids[b], (a, b)
    assert all(ex.qid == make_qid(name, ex.query) for ex in examples)
    assert len({query_key(ex.query) for ex in examples}) == len(set().union(*qids.values()))
    # the report is in the dataset info and next to the data
    on_disk = json.loads((Path(builder.data_dir) / "build_report.json").read_text())
    assert on_disk["rows_written"] == report.rows_written
    assert builder.info.metadata["build_report"]["splits"] == on_disk["splits"]


def test_homedepot_label_is_the_nearest_grade_to_the_mean(tmp_path):
    means = ["1", "1.33", "1.5", "1.67", "2.25", "2.5", "2.67", "3", "abc", "3.5", "2"]
    lines = ["id,product_uid,product_title,search_term,relevance"]
    lines += [f"{i},{100 + i},Title {i},term {i},{m}" for i, m in enumerate(means)]
    lines[-1] = "99,100,Title 0,Term  0,2"  # "term 0" again, same product: a duplicate pair
    with zipfile.ZipFile(tmp_path / "train.csv.zip", "w") as z:
        z.writestr("train.csv", "\n".join(lines).encode("latin-1"))
    builder = make_builder("homedepot", data_dir=tmp_path / "data", on_bad_row="skip")
    examples, report = builder.read_examples(tmp_path)
    assert [ex.label for _, ex in examples] == [1, 1, 2, 2, 2, 2, 3, 3]  # ties (x.5) -> 2
    assert [ex.meta["relevance_mean"] for _, ex in examples][:3] == [1.0, 1.33, 1.5]
    assert report.skipped == {"unparseable_grade": 1, "out_of_scale_grade": 1, "duplicate_id": 1}
    assert "train.csv.zip/train.csv:12: field 'product_uid'" in str(report.skipped_examples)


def test_qid_is_a_hash_of_the_normalised_query():
    assert make_qid("hd", "Fence  Mesh ") == make_qid("hd", "fence mesh")
    assert make_qid("hd", "ｆｅｎｃｅ") == make_qid("hd", "fence")  # NFKC: full-width letters
    assert make_qid("hd", "fence mesh") != make_qid("cf", "fence mesh")
    assert make_qid("hd", "fence mesh").startswith("hd:")


def test_splits_are_deterministic_query_disjoint_and_80_10_10():
    def ex(i, q):
        return (f"f:{i}", RelevanceExample(f"s:{q}", f"query {q}", "doc", 1, "qbqtc3", "s"))

    rows = [ex(i, i % 997) for i in range(4000)]

    def longtail(key, n):
        return key.endswith("7")

    by_split = assign_splits(rows, longtail)
    shuffled = assign_splits(rows[1::2] + rows[::-2], longtail)  # same rows, another order
    split_of = {ex.qid: s for s, items in by_split.items() for _, ex in items}
    assert all(split_of[ex.qid] == s for s, items in shuffled.items() for _, ex in items)
    assert {ex.query[-1] for _, ex in by_split["longtail"]} == {"7"}
    queries = {s: len({ex.qid for _, ex in items}) for s, items in by_split.items()}
    assert queries == {"train": 718, "validation": 90, "test": 90, "longtail": 99}
    assert split_sizes(150) == {"train": 120, "validation": 15, "test": 15}
    assert split_sizes(4) == {"train": 2, "validation": 1, "test": 1}
    assert split_sizes(2) == {"train": 2, "validation": 0, "test": 0}
    # pinned: changing the salt or the hash reshuffles every published split
    ranked = sorted((f"q{i}" for i in range(6)), key=split_rank)
    assert ranked == ["q2", "q1", "q0", "q3", "q5", "q4"]


def test_strip_html_keeps_text_and_decodes_entities():
    html = "<p>Thank&nbsp;you!</p><br/><b>Size</b> < 5 &amp; more<script>x()</script>"
    assert strip_html(html) == "Thank you! Size < 5 & more"
    assert strip_html("  plain\n text ") == "plain text"


# ---- planted faults ---------------------------------------------------------------------------
GOOD = {"query": "red shoes", "doc": "Red running shoes, size 42", "label": 2, "scale": "trec4"}
FAULTS = {  # kind -> (a JSONL line, the field named in the error)
    Reason.MISSING_FIELD: (json.dumps({k: v for k, v in GOOD.items() if k != "doc"}), "doc"),
    Reason.UNPARSEABLE_GRADE: (json.dumps({**GOOD, "label": "two"}), "label"),
    Reason.OUT_OF_SCALE: (json.dumps({**GOOD, "label": 7}), "label"),
    Reason.EMPTY_QUERY: (json.dumps({**GOOD, "query": "  "}), "query"),
    Reason.EMPTY_DOC: (json.dumps({**GOOD, "doc": "\n"}), "doc"),
    Reason.INVALID_UTF8: (
        b'{"query": "caf\xe9", "doc": "d", "label": 1, "scale": "trec4"}',
        "query",
    ),
    Reason.DUPLICATE_ID: (json.dumps({**GOOD, "query": "q0", "doc": "doc 0"}), "doc"),
}


def write_jsonl_with_faults(path: Path, kinds) -> dict[int, Reason]:
    """Good rows q0..q19 with one row of each `kinds` planted after row 5; line -> kind."""
    lines: list[bytes] = []
    planted = {}
    for i in range(20):
        lines.append(json.dumps({**GOOD, "query": f"q{i}", "doc": f"doc {i}"}).encode())
        if i == 5:
            for kind in kinds:
                line, _ = FAULTS[kind]
                lines.append(line if isinstance(line, bytes) else line.encode())
                planted[len(lines)] = kind
    path.write_bytes(b"\n".join(lines) + b"\n")
    return planted


@pytest.mark.parametrize("kind", list(FAULTS), ids=str)
def test_a_bad_row_stops_the_build_with_file_line_and_field(kind, tmp_path):
    planted = write_jsonl_with_faults(tmp_path / "mine.jsonl", [kind])
    builder = make_builder("jsonl", data_dir=tmp_path / "data")
    with pytest.raises(BadRow) as info:
        builder.read_examples(tmp_path)
    (line,) = planted
    err = info.value
    assert (err.reason, err.file, err.line, err.field) == (
        kind,
        "mine.jsonl",
        line,
        FAULTS[kind][1],
    )
    assert str(err).startswith(f"mine.jsonl:{line}: field '{FAULTS[kind][1]}': expected ")


def test_skip_counts_bad_rows_per_reason_and_read_is_written_plus_skipped(tmp_path):
    (tmp_path / "raw").mkdir()
    planted = write_jsonl_with_faults(tmp_path / "raw" / "mine.jsonl", list(FAULTS))
    builder = build(
        "jsonl", manual_dir=tmp_path / "raw", data_dir=tmp_path / "data", on_bad_row="skip"
    )
    report = json.loads((Path(builder.data_dir) / "build_report.json").read_text())
    assert report["skipped"] == {str(kind): 1 for kind in planted.values()}
    assert report["rows_read"] == 20 + len(FAULTS)
    assert report["rows_read"] == report["rows_written"] + sum(report["skipped"].values())
    assert report["rows_written"] == 20
    assert builder.info.metadata["build_report"]["skipped"] == report["skipped"]
    examples = [ex for exs in read_back("jsonl", tmp_path / "data").values() for ex in exs]
    assert sorted(ex.query for ex in examples) == sorted(f"q{i}" for i in range(20))
    first = report["skipped_examples"]["invalid_utf8"][0]
    assert first.startswith("mine.jsonl:") and "field 'query'" in first and "\\xe9" in first


def test_planted_faults_in_a_csv_source(tmp_path):
    header = "id,query,product_title,product_description,median_relevance,relevance_variance\n"
    rows = [f'{i},q{i},"Title {i}","<p>multi\nline</p>",3,0.5\n' for i in range(8)]
    rows += [
        "8,q8,Title 8\n",  # missing fields
        "9,q9,Title 9,d,high,0\n",  # unparseable grade
        "10,q10,Title 10,d,5,0\n",  # out of scale
        '11," ",Title 11,d,2,0\n',  # empty query
        "12,q12,,d,2,0\n",  # empty doc
        "3,q13,Title 13,d,2,0\n",  # duplicate id
    ]
    data = (header + "".join(rows)).encode() + b"14,q14,Title \xff,d,2,0\n"  # invalid UTF-8
    (tmp_path / "train_fold1.csv").write_bytes(data)
    builder = make_builder("crowdflower", data_dir=tmp_path / "data")
    with pytest.raises(BadRow, match=r"train_fold1.csv:18: field 'product_description'"):
        builder.read_examples(tmp_path)  # rows 0-7 take two lines each
    skipping = make_builder("crowdflower", data_dir=tmp_path / "data", on_bad_row="skip")
    examples, report = skipping.read_examples(tmp_path)
    assert report.rows_read == 15 and report.rows_written == len(examples) == 8
    assert sorted(report.skipped) == sorted(str(r) for r in list(FAULTS))
    assert examples[0][1].doc == "Title 0\nmulti line"
    assert examples[0][1].meta == {"id": "0", "fold": 1, "relevance_variance": 0.5}


def test_trec_grades_are_checked_against_the_qrels(tmp_path):
    rows = [
        {"dataset": "trec-dl19-passage", "qid": "1", "query": "q", "docid": "7", "label": 2},
        {"dataset": "trec-dl19-passage", "qid": "1", "query": "q", "docid": "8", "label": 3},
        {"dataset": "trec-dl19-passage", "qid": "1", "query": "q", "docid": "9", "label": 0},
    ]
    for row in rows:
        row["passage"] = f"passage {row['docid']}"
    (tmp_path / "trec_dl_judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qrels.dl19-passage.txt").write_text("1 Q0 7 2\n1 Q0 8 1\n")
    builder = make_builder("trec_dl", data_dir=tmp_path / "data", on_bad_row="skip")
    examples, report = builder.read_examples(tmp_path)
    assert [ex.meta["docid"] for _, ex in examples] == ["7"]
    assert report.skipped == {"qrels_mismatch": 2}
    assert "the grade in qrels.dl19-passage.txt, 1" in report.skipped_examples["qrels_mismatch"][0]


def test_jsonl_keeps_given_qids_steps_and_meta(tmp_path):
    rows = [
        {**GOOD, "qid": 17, "steps": {"step1": {"subject": "shoes"}}, "meta": {"doc_id": "a"}},
        {**GOOD, "doc": "other doc", "meta": {"doc_id": "a"}},  # same query, same doc_id
        {**GOOD, "query": "blue hat", "doc_title": "Hat", "source": "shop"},
        {**GOOD, "colour": "red"},
        {**GOOD, "scale": "stars10"},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = make_builder("jsonl", data_dir=tmp_path / "data", on_bad_row="skip")
    examples, report = builder.read_examples(tmp_path)
    first, second, third = (ex for _, ex in examples)
    assert first.qid == "17" and first.steps == {"step1": {"subject": "shoes"}}
    assert second.qid == make_qid("jsonl", "red shoes")  # derived: no qid given
    assert third.source == "shop" and third.doc_title == "Hat"
    assert third.qid == make_qid("shop", "blue hat")
    assert report.skipped == {"bad_value": 2}
    # (qid, doc_id) repeats only when the qid is derived for both rows
    rows[0].pop("qid")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    _, report = builder.read_examples(tmp_path)
    assert report.skipped == {"duplicate_id": 1}


def test_a_broken_json_array_names_its_line(tmp_path):
    good = {"id": "s1", "query": "q", "title": "t", "label": "1"}
    text = json.dumps([good], indent=2)[:-2] + ',\n  {"id": "s2", "query": }\n]'
    (tmp_path / "KUAKE-QTR_train.json").write_text(text)
    (tmp_path / "KUAKE-QTR_dev.json").write_text(json.dumps([{**good, "id": "s1"}], indent=2))
    builder = make_builder("kuake_qtr", data_dir=tmp_path / "data", on_bad_row="skip")
    with pytest.raises(ValueError, match=r"KUAKE-QTR_train.json:8: not a JSON array"):
        builder.read_examples(tmp_path)
    (tmp_path / "KUAKE-QTR_train.json").write_text(json.dumps([good, good], indent=2))
    _, report = builder.read_examples(tmp_path)
    assert report.skipped == {"duplicate_id": 1}  # s1 twice in train; s1 in dev is fine
    assert "KUAKE-QTR_train.json:8: field 'id'" in report.skipped_examples["duplicate_id"][0]
