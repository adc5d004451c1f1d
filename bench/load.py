"""Closed-loop load: N clients, each starting its next run when the last one ends.

A cell ends when its duration is up or when it has started its run budget,
whichever comes first; runs in flight then finish (each bounded by its own
timeout) and count. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple

import trio

from bench.stats import Tally


class Outcome(NamedTuple):
    problem: str  # "" when the run was ok, else what went wrong
    seconds: float  # latency as the client saw it
    reported_ms: float | None = None  # the run's own wall time, as the daemon reported it
    cpu_ms: float | None = None  # the run's worker's CPU, as the daemon reported it


RunOnce = Callable[[], Awaitable[Outcome]]


class ClientStopped(Exception):
    """A client cannot go on (e.g. its connection is gone); counted as one error."""


# Hard ceiling of runs per cell, whatever the flags say.
MAX_RUNS_PER_CELL = 1_000_000


@dataclass(frozen=True)
class Budget:
    seconds: float  # stop starting runs after this long
    runs: int  # stop starting runs after this many (over all clients)
    run_timeout: float  # one run longer than this is an error (client-side bound)
    # Seconds a client waits between an answer and its next request (0: closed loop).
    # A closed loop measures throughput; a pause shows latency while the pools keep up.
    think: float = 0.0


async def run_cell(clients: list[RunOnce], budget: Budget) -> tuple[Tally, float]:
    """Runs one closed-loop client per runner; returns the tally and the wall time in s."""
    tally = Tally()
    started = 0
    max_runs = min(budget.runs, MAX_RUNS_PER_CELL)
    start = time.perf_counter()
    deadline = start + budget.seconds
    last_end = start

    async def client(run_once: RunOnce) -> None:
        nonlocal started, last_end
        while started < max_runs and time.perf_counter() < deadline:
            started += 1
            outcome = None
            with trio.move_on_after(budget.run_timeout):
                try:
                    outcome = await run_once()
                except ClientStopped as exc:
                    tally.error(str(exc))
                    return
            if outcome is None:
                tally.error(f"no answer within {budget.run_timeout:g} s (client timeout)")
            elif outcome.problem:
                tally.error(outcome.problem)
            else:
                tally.ok(outcome.seconds, outcome.reported_ms, outcome.cpu_ms)
            last_end = time.perf_counter()
            if budget.think:
                await trio.sleep(budget.think)

    async with trio.open_nursery() as nursery:
        for run_once in clients:
            nursery.start_soon(client, run_once)
    return tally, last_end - start
