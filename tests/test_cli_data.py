"""`jaxgrm data list | build | stats` through click's CliRunner."""

import json

import pytest
from click.testing import CliRunner
from test_builders import needs_shared, slice_crowdflower

from jaxgrm.cli import main
from jaxgrm.data.builders import BUILDERS

ROWS = [
    {"query": f"query {i % 6}", "doc": f"document {i}", "label": i % 4, "scale": "trec4"}
    for i in range(40)
] + [{"query": "a rare query", "doc": "its only document", "label": 3, "scale": "trec4"}]


def run(*args, env=None):
    return CliRunner().invoke(main, ["data", *map(str, args)], env=env, catch_exceptions=False)


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_list_names_every_builder():
    result = run("list")
    assert result.exit_code == 0
    for name in BUILDERS:
        assert result.output.count(f"{name} ") >= 1


def test_build_then_stats(jsonl, tmp_path):
    data_dir = tmp_path / "data"
    result = run("build", "jsonl", "--manual-dir", jsonl, "--data-dir", data_dir, "--name", "mine")
    assert result.exit_code == 0, result.output
    assert "rows read 41, written 41, skipped 0 (none)" in result.output
    assert (data_dir / "jsonl" / "mine" / "1.0.0" / "build_report.json").is_file()

    again = run("build", "jsonl", "--manual-dir", jsonl, "--data-dir", data_dir, "--name", "mine")
    assert again.exit_code == 0 and "already prepared" in again.output

    result = run("stats", "jsonl", "--name", "mine", "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    assert "longtail" in result.output and "g3" in result.output
    assert "rows read 41, written 41, skipped 0 (none)" in result.output

    stats = json.loads(run("stats", "jsonl/mine", "--data-dir", data_dir, "--json").output)
    assert stats["splits"]["longtail"] == {"pairs": 1, "queries": 1, "grades": {"3": 1}}
    assert sum(s["pairs"] for s in stats["splits"].values()) == 41
    assert sum(s["queries"] for s in stats["splits"].values()) == 7


def test_bad_rows_raise_by_default_and_are_counted_with_skip(jsonl, tmp_path):
    with jsonl.open("a") as f:
        f.write('{"query": "q", "doc": "d", "label": 9, "scale": "trec4"}\n')
        f.write('{"query": "q", "label": 1, "scale": "trec4"}\n')
    data_dir = tmp_path / "data"
    result = run("build", "jsonl", "--manual-dir", jsonl, "--data-dir", data_dir)
    assert result.exit_code != 0
    assert "mine.jsonl:42: field 'label': expected an integer grade in [0, 3], got 9" in (
        result.output
    )
    assert "--on-bad-row=skip" in result.output
    assert not (data_dir / "jsonl" / "mine" / "1.0.0").exists()

    args = ("build", "jsonl", "--manual-dir", jsonl, "--data-dir", data_dir, "--on-bad-row", "skip")
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "rows read 43, written 41, skipped 2 (missing_field: 1, out_of_scale_grade: 1)" in (
        result.output
    )
    stats = run("stats", "jsonl", "--data-dir", data_dir)
    assert "skipped 2 (missing_field: 1, out_of_scale_grade: 1)" in stats.output


@needs_shared
def test_build_and_stats_of_a_real_set_slice(tmp_path):
    raw, data_dir = tmp_path / "raw", tmp_path / "data"
    raw.mkdir()
    slice_crowdflower(raw)
    result = run("build", "crowdflower", "--manual-dir", raw, "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    assert "rows read 120, written 120" in result.output
    stats = json.loads(run("stats", "crowdflower", "--data-dir", data_dir, "--json").output)
    assert set(stats["splits"]) <= {"train", "validation", "test", "longtail"}
    assert sum(s["pairs"] for s in stats["splits"].values()) == stats["rows_written"] == 120
    assert set().union(*(s["grades"] for s in stats["splits"].values())) <= {"1", "2", "3", "4"}


def test_data_dir_comes_from_the_environment(jsonl, tmp_path):
    env = {"JAXGRM_DATA_DIR": str(tmp_path / "env_dir")}
    assert run("build", "jsonl", "--manual-dir", jsonl, env=env).exit_code == 0
    assert (tmp_path / "env_dir" / "jsonl" / "mine" / "1.0.0").is_dir()
    assert run("stats", "jsonl/mine", env=env).exit_code == 0


def test_usage_errors(tmp_path):
    result = run("build", "crowdflower", "--data-dir", tmp_path)
    assert result.exit_code == 2 and "needs --manual-dir" in result.output
    result = run("build", "nosuchset", "--manual-dir", tmp_path)
    assert result.exit_code == 2 and "unknown data set" in result.output
    result = run("stats", "qbqtc", "--data-dir", tmp_path)
    assert result.exit_code == 1 and "jaxgrm data build qbqtc" in result.output
    result = run("build", "qbqtc", "--manual-dir", tmp_path, "--data-dir", tmp_path / "d")
    assert result.exit_code == 2 and "needs --manual-dir, a folder with its raw" in result.output
    (tmp_path / "test.json").write_text("{}\n")
    result = run("build", "qbqtc", "--manual-dir", tmp_path, "--data-dir", tmp_path / "d")
    assert result.exit_code == 1 and "missing dev.json" in result.output


def test_build_the_small_world_and_read_its_stats(tmp_path):
    result = run("build", "world", "--name", "small", "--data-dir", tmp_path)
    assert result.exit_code == 0 and "prepared at" in result.output, result.output
    stats = json.loads(run("stats", "world/small", "--data-dir", tmp_path, "--json").output)
    assert stats["splits"]["train"]["pairs"] > 0 and "longtail" in stats["splits"]
    assert "rows_read" not in stats  # no build report: nothing is read from files


def test_stats_world_prints_the_world_report(monkeypatch):
    import jaxgrm.data.world as world

    fake = {"splits": {"train": {"pairs": 3}}}
    calls = []
    monkeypatch.setattr(world, "stats_report", lambda cfg: calls.append(cfg) or fake, raising=False)
    monkeypatch.setattr(world, "format_stats", lambda r: f"world table {r}", raising=False)
    result = run("stats", "world")
    assert result.exit_code == 0, result.output
    assert "world table" in result.output and isinstance(calls[0], world.WorldConfig)
