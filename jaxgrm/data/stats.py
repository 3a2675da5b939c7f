"""Statistics of a prepared data set, read back through `tfds.data_source`.

Per split: pairs, distinct queries, the grade histogram; plus the build report's rows read,
rows skipped per reason and build time (from `build_report.json`, else the dataset info).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from jaxgrm.data.builders import default_data_dir, load_report
from jaxgrm.data.builders.base import SPLITS


class NotBuiltError(FileNotFoundError):
    pass


def dataset_stats(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Stats of prepared data set `name` ("homedepot", "jsonl/mydata", ...) in `data_dir`."""
    import tensorflow_datasets as tfds

    path = _latest_version_dir(Path(data_dir or default_data_dir()) / name)
    builder = tfds.builder_from_directory(str(path))  # what tfds.data_source(name) resolves to
    splits = sorted(builder.info.splits, key=lambda s: (SPLITS + (s,)).index(s))
    out: dict[str, Any] = {"name": name, "path": str(path), "splits": {}}
    for split in splits:
        source = builder.as_data_source(split=split)
        qids, grades = set(), Counter()
        for start in range(0, len(source), 4096):
            for record in source.__getitems__(range(start, min(start + 4096, len(source)))):
                qids.add(record["qid"])
                grades[int(record["label"])] += 1
        out["splits"][split] = {
            "pairs": len(source),
            "queries": len(qids),
            "grades": dict(sorted(grades.items())),
        }
    report = load_report(path) or dict(builder.info.metadata or {}).get("build_report")
    if report:
        out["rows_read"] = report["rows_read"]
        out["rows_written"] = report["rows_written"]
        out["skipped"] = report["skipped"]
        out["build_seconds"] = report.get("build_seconds")
        out["longtail_rule"] = report.get("longtail_rule", "")
    return out


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text table of `dataset_stats`."""
    grades = sorted({g for s in stats["splits"].values() for g in s["grades"]})
    head = ["split", "pairs", "queries", *(f"g{g}" for g in grades)]
    rows = [head]
    total = Counter()
    for split, s in stats["splits"].items():
        rows.append([split, s["pairs"], s["queries"], *(s["grades"].get(g, 0) for g in grades)])
        total.update({"pairs": s["pairs"], "queries": s["queries"]})
        total.update({g: s["grades"].get(g, 0) for g in grades})
    rows.append(["all", total["pairs"], total["queries"], *(total[g] for g in grades)])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = [f"{stats['name']}  ({stats['path']})"]
    for r in rows:
        cells = [
            str(c).rjust(w) if i else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    if "rows_read" in stats:
        skipped = stats["skipped"]
        detail = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
        lines.append(
            f"rows read {stats['rows_read']}, written {stats['rows_written']}, "
            f"skipped {sum(skipped.values())} ({detail})"
        )
        if stats.get("longtail_rule"):
            lines.append(f"longtail: {stats['longtail_rule']}")
        if stats.get("build_seconds") is not None:
            lines.append(f"build time {stats['build_seconds']:.1f} s")
    return "\n".join(lines)


def _latest_version_dir(root: Path) -> Path:
    versions = [p for p in root.glob("*") if (p / "dataset_info.json").is_file()]
    if not versions:
        raise NotBuiltError(f"no prepared data set at {root}")

    def key(p: Path):
        parts = p.name.split(".")
        return tuple(int(x) if x.isdigit() else -1 for x in parts)

    return max(versions, key=key)
