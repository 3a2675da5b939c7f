"""TFDS builders of relevance data sets, found by name; each writes RelevanceExample records.

    build("homedepot", manual_dir="../shared/data/homedepot-search-relevance", on_bad_row="skip")
    tfds.data_source("homedepot", data_dir=default_data_dir())["longtail"]

Builders live in their own modules and are imported on first use (TFDS registers a builder
class when its module is imported), so listing them costs nothing. Every builder writes
array_record (no TensorFlow needed) with the splits train / validation / test / longtail; see
`base` for qids, splits and the bad-row policy, and each builder's docstring for its source.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

# name -> ("module:Class", one-line summary)
BUILDERS: dict[str, tuple[str, str]] = {
    "homedepot": (
        "jaxgrm.data.builders.homedepot:HomeDepot",
        "Home Depot product search, EN, 74k pairs; mean of raters rounded to homedepot3 (1-3)",
    ),
    "crowdflower": (
        "jaxgrm.data.builders.crowdflower:CrowdFlower",
        "CrowdFlower product search, EN, 10k pairs; median grade on crowdflower4 (1-4)",
    ),
    "trec_dl": (
        "jaxgrm.data.builders.trec_dl:TrecDl",
        "TREC DL 2019-2021 passages, EN, 14k pairs; NIST grades on trec4 (0-3)",
    ),
    "kuake_qtr": (
        "jaxgrm.data.builders.kuake_qtr:KuakeQtr",
        "KUAKE-QTR medical search titles, ZH, 27k pairs; kuake4 (0-3)",
    ),
    "qbqtc": (
        "jaxgrm.data.builders.qbqtc:Qbqtc",
        "QBQTC web search titles, ZH, 20k pairs; qbqtc3 (0-2)",
    ),
    "jsonl": (
        "jaxgrm.data.builders.jsonl:Jsonl",
        "your own pairs as JSON lines of RelevanceExample fields (any scale in SCALES)",
    ),
    "world": (
        "jaxgrm.data.builders.world:World",
        "the synthetic relevance world: notes, queries, grades and step truth",
    ),
}
DATA_DIR_ENV = "JAXGRM_DATA_DIR"


def default_data_dir() -> Path:
    """$JAXGRM_DATA_DIR, else ~/jaxgrm_data."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / "jaxgrm_data").expanduser()


def builder_class(name: str) -> type:
    """The builder class registered under `name` (imports its module)."""
    if name not in BUILDERS:
        raise KeyError(f"unknown data set {name!r}; expected one of {', '.join(BUILDERS)}")
    module, cls = BUILDERS[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def make_builder(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    on_bad_row: str = "raise",
    config: Any = None,
):
    """An array_record builder instance; `config` is a config name or object (JSONL: a
    `JsonlConfig`). `on_bad_row` applies to builders of files (all but `world`)."""
    from jaxgrm.data.builders.base import RelevanceBuilder

    cls = builder_class(name)
    kwargs: dict[str, Any] = {"data_dir": str(data_dir or default_data_dir())}
    kwargs["file_format"] = "array_record"
    if config is not None:
        kwargs["config"] = config
    if issubclass(cls, RelevanceBuilder):
        kwargs["on_bad_row"] = on_bad_row
    return cls(**kwargs)


def build(
    name: str,
    *,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    on_bad_row: str = "raise",
    config: Any = None,
    overwrite: bool = False,
):
    """Prepare data set `name` (a no-op when this version is already built, unless
    `overwrite`); return the builder, whose `prepared_now` says whether it built anything.
    Raises `base.BadRow` on a bad row under "raise"."""
    import tensorflow_datasets as tfds

    builder = make_builder(name, data_dir=data_dir, on_bad_row=on_bad_row, config=config)
    builder.prepared_now = overwrite or not builder.is_prepared()
    mode = tfds.download.GenerateMode
    download_config = tfds.download.DownloadConfig(
        manual_dir=str(manual_dir) if manual_dir is not None else None,
        download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS,
    )
    builder.download_and_prepare(download_config=download_config)
    return builder


def load_report(dataset_path: str | os.PathLike) -> dict[str, Any] | None:
    """The build report next to a prepared data set, or None (e.g. the synthetic world)."""
    path = Path(dataset_path) / "build_report.json"
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = [
    "BUILDERS",
    "DATA_DIR_ENV",
    "build",
    "builder_class",
    "default_data_dir",
    "load_report",
    "make_builder",
]
