"""A cell is bounded by its run budget, and a stopped client counts as an error."""

from __future__ import annotations

import trio

from bench.load import Budget, ClientStopped, Outcome, RunOnce, run_cell


def _counting(outcomes: list[bool]) -> RunOnce:
    async def run_once() -> Outcome:
        await trio.sleep(0)
        ok = outcomes.pop(0) if outcomes else True
        return Outcome("" if ok else "status error", 0.001, 0.5)

    return run_once


async def test_a_cell_starts_exactly_its_run_budget_over_all_clients() -> None:
    budget = Budget(seconds=60.0, runs=25, run_timeout=5.0)
    tally, seconds = await run_cell([_counting([]) for _ in range(4)], budget)
    assert len(tally.latencies) == 25
    assert tally.reported == [0.5] * 25
    assert tally.error_count == 0
    assert seconds >= 0


async def test_failed_runs_are_counted_with_their_description() -> None:
    budget = Budget(seconds=60.0, runs=5, run_timeout=5.0)
    tally, _ = await run_cell([_counting([True, False, True, False, False])], budget)
    assert len(tally.latencies) == 2
    assert tally.errors == {"status error": 3}


async def test_a_stopped_client_counts_one_error_and_stops() -> None:
    calls = 0

    async def broken() -> Outcome:
        nonlocal calls
        calls += 1
        raise ClientStopped("connection lost: the daemon closed the connection")

    budget = Budget(seconds=60.0, runs=100, run_timeout=5.0)
    tally, _ = await run_cell([broken], budget)
    assert calls == 1
    assert tally.errors == {"connection lost: the daemon closed the connection": 1}


async def test_a_run_past_its_timeout_is_an_error(autojump_clock: trio.abc.Clock) -> None:
    async def silent() -> Outcome:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    budget = Budget(seconds=60.0, runs=2, run_timeout=3.0)
    tally, _ = await run_cell([silent], budget)
    assert tally.errors == {"no answer within 3 s (client timeout)": 2}
