"""What one cell of the table measured, and the numbers derived from it."""

from __future__ import annotations

import math
from collections import Counter

import msgspec

from bench.cpu import Breakdown

# Distinct error descriptions kept per cell (the count of each is always kept).
MAX_ERROR_KINDS = 8


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (p99 of 50 samples is the max)."""
    if not sorted_values:
        raise ValueError("percentile of no samples")
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class Tally:
    """Collects one cell's outcomes while it runs."""

    def __init__(self) -> None:
        self.latencies: list[float] = []  # seconds, ok runs only
        self.reported: list[float] = []  # ms, the daemon's own wall_ms of ok runs
        self.errors: Counter[str] = Counter()
        self.cpu_runs = 0  # ok runs whose answer carried the worker's cpu_ms
        self.cpu_ms = 0.0  # their sum

    def ok(
        self, seconds: float, reported_ms: float | None = None, cpu_ms: float | None = None
    ) -> None:
        self.latencies.append(seconds)
        if reported_ms is not None:
            self.reported.append(reported_ms)
        if cpu_ms is not None:
            self.cpu_runs += 1
            self.cpu_ms += cpu_ms

    def error(self, description: str) -> None:
        if description in self.errors or len(self.errors) < MAX_ERROR_KINDS:
            self.errors[description] += 1
        else:
            self.errors["(other errors)"] += 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class Cell(msgspec.Struct, frozen=True):
    """One row: a system running a workload with some number of clients."""

    system: str
    workload: str
    clients: int
    runs: int  # ok runs
    errors: int  # runs that did not come back ok with the expected stdout
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    runs_per_s: float  # ok runs per second of the cell's wall time
    # p50 of the runs' wall_ms as the daemon reported it (None for baselines):
    # the gap to p50_ms is protocol, queueing and waiting for a ready worker.
    reported_p50_ms: float | None
    seconds: float
    error_kinds: dict[str, int] = {}
    unavailable: str | None = None  # why the row has no numbers ("n/a (...)")
    cpu: Breakdown | None = None  # where the CPU went (sandboxd cells the bench started)


def summarize(system: str, workload: str, clients: int, tally: Tally, seconds: float) -> Cell:
    values = sorted(tally.latencies)
    has = bool(values)
    return Cell(
        system=system,
        workload=workload,
        clients=clients,
        runs=len(values),
        errors=tally.error_count,
        p50_ms=percentile(values, 0.50) * 1000 if has else None,
        p99_ms=percentile(values, 0.99) * 1000 if has else None,
        mean_ms=sum(values) / len(values) * 1000 if has else None,
        runs_per_s=len(values) / seconds if seconds > 0 else 0.0,
        reported_p50_ms=percentile(sorted(tally.reported), 0.50) if tally.reported else None,
        seconds=seconds,
        error_kinds=dict(tally.errors),
    )


def unavailable(system: str, workload: str, clients: int, reason: str) -> Cell:
    return Cell(
        system=system,
        workload=workload,
        clients=clients,
        runs=0,
        errors=0,
        p50_ms=None,
        p99_ms=None,
        mean_ms=None,
        runs_per_s=0.0,
        reported_p50_ms=None,
        seconds=0.0,
        unavailable=reason,
    )
