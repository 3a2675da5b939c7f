"""The benchmark's pure pieces (the measurements themselves are run by hand, not in CI)."""

import pytest

from experiments.bench.perf import _span, merge_rounds


def test_merge_rounds_pools_timed_runs_of_all_rounds():
    rounds = [
        dict(tokens_per_s=100.0, times_s=[1.0, 1.2, 1.1], peak_rss_mb=400, compile_s=2.0),
        dict(tokens_per_s=50.0, runs_s=[2.0, 2.2, 1.9], peak_rss_mb=450, median_s=2.0),
    ]
    m = merge_rounds(rounds, tokens=100)
    assert m["times_s"] == [1.0, 1.2, 1.1, 2.0, 2.2, 1.9]
    assert m["step_s"] == pytest.approx(1.55)  # median of the six runs
    assert m["tokens_per_s"] == pytest.approx(100 / 1.55)
    assert m["peak_rss_mb"] == 450 and m["compile_s"] == 2.0
    assert m["rounds_tokens_per_s"] == [100.0, 50.0]
    assert "runs_s" not in m and "median_s" not in m and "failed_rounds" not in m


def test_merge_rounds_keeps_failures_visible():
    bad = dict(error="worker exited 1")
    m = merge_rounds([bad, dict(tokens_per_s=10.0, times_s=[1.0], peak_rss_mb=1)], tokens=10)
    assert m["tokens_per_s"] == pytest.approx(10.0) and m["failed_rounds"] == [bad]
    assert merge_rounds([bad, bad], tokens=10) == bad


def test_span_of_round_ratios():
    assert _span([1.2, None, 1.5, 1.3]) == " (1.20-1.50)"
    assert _span([1.2]) == "" and _span(None) == ""
