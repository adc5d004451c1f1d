"""Percentiles are nearest-rank, and a cell keeps every error count."""

from __future__ import annotations

import pytest

from bench.stats import MAX_ERROR_KINDS, Tally, percentile, summarize


def test_p50_of_an_even_count_is_the_lower_middle() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0


def test_p99_of_fewer_than_100_samples_is_the_maximum() -> None:
    assert percentile([float(v) for v in range(50)], 0.99) == 49.0


def test_p99_of_1000_samples_leaves_out_the_top_ten() -> None:
    values = [float(v) for v in range(1000)]
    assert percentile(values, 0.99) == 989.0


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_errors_beyond_the_kind_cap_are_still_counted() -> None:
    tally = Tally()
    for kind in range(MAX_ERROR_KINDS + 5):
        tally.error(f"kind {kind}")
    assert tally.error_count == MAX_ERROR_KINDS + 5
    assert tally.errors["(other errors)"] == 5


def test_summary_counts_only_ok_runs_as_runs_and_rates_them_per_second() -> None:
    tally = Tally()
    for ms in (1, 2, 3, 4):
        tally.ok(ms / 1000)
    tally.error("status timeout")
    cell = summarize("sandboxd", "python3 hello", 2, tally, seconds=2.0)
    assert (cell.runs, cell.errors) == (4, 1)
    assert cell.runs_per_s == 2.0
    assert cell.p50_ms == pytest.approx(2.0)
    assert cell.p99_ms == pytest.approx(4.0)
    assert cell.error_kinds == {"status timeout": 1}


def test_a_cell_with_only_errors_has_no_latency() -> None:
    tally = Tally()
    tally.error("error reply internal: boom")
    cell = summarize("sandboxd", "python3 hello", 1, tally, seconds=1.0)
    assert cell.p50_ms is None
    assert cell.runs == 0
    assert cell.errors == 1


def test_the_daemons_own_run_time_is_summarized_beside_the_client_latency() -> None:
    tally = Tally()
    for ms in (10, 20, 30):
        tally.ok(ms / 1000, reported_ms=ms / 10)
    cell = summarize("sandboxd", "python3 hello", 1, tally, seconds=1.0)
    assert cell.reported_p50_ms == pytest.approx(2.0)
    assert cell.p50_ms == pytest.approx(20.0)
