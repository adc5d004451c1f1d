"""The daemon's counters, rendered in the Prometheus text format 0.0.4.

Pure: callers tell it what happened, ``render()`` gives bytes; no I/O, no
prometheus_client. Series (all names prefixed ``sandboxd_``):

  runs_total{language,status}              counter: runs answered, by RunResult status
  run_duration_seconds{language}           histogram: request latency of a run
  queue_wait_seconds{language}             histogram: admission to a worker in hand
  queue_depth                              gauge: runs waiting for a worker
  ready_workers{language}                  gauge: warm workers ready for a job
  busy_slots                               gauge: runs holding one of the max_workers slots
  slots                                    gauge: max_workers, the slots there are
  overload_refusals_total{reason}          counter: requests refused at admission, by
                                           REFUSAL_REASONS
  worker_spawn_failures_total{language}    counter: workers that failed to start

What to scale on: queue_depth above 0 for long, busy_slots near slots, a rising
overload_refusals_total, the queue_wait_seconds quantiles; ready_workers at 0 for
a language means it cannot serve (etc/prometheus/sandboxd-alerts.yml).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

from sandboxd.protocol import LANGUAGES

RefusalReason = Literal["queue_full", "stopping"]
# Why admission refuses a request with `overloaded`: the queue bound
# ([limits] max_requests) is reached, or the daemon is stopping.
REFUSAL_REASONS: tuple[RefusalReason, ...] = ("queue_full", "stopping")

# Upper bounds of the latency buckets in seconds: warm runs take milliseconds,
# timeouts reach the request cap (60 s by default).
BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_label_value(value)}"' for name, value in pairs) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        for index, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[index] += 1
                break
        self.total += 1
        self.sum += seconds


class Metrics:
    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], int] = defaultdict(int)
        self._latency: dict[str, _Histogram] = {}
        self._queue_wait: dict[str, _Histogram] = {}
        self._queue_depth = 0
        self._ready: dict[str, int] = {}
        self._busy_slots = 0
        self._slots = 0
        self._refusals: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        # Present at zero from the start, so rate() and alerts work before a failure.
        self._spawn_failures: dict[str, int] = dict.fromkeys(LANGUAGES, 0)

    def observe_run(self, language: str, status: str, seconds: float) -> None:
        self._runs[(language, status)] += 1
        self._latency.setdefault(language, _Histogram()).observe(seconds)

    def observe_queue_wait(self, language: str, seconds: float) -> None:
        self._queue_wait.setdefault(language, _Histogram()).observe(seconds)

    def refused(self, reason: RefusalReason) -> None:
        self._refusals[reason] += 1

    def set_slots(self, busy: int, total: int) -> None:
        self._busy_slots, self._slots = busy, total

    def spawn_failed(self, language: str) -> None:
        self._spawn_failures[language] = self._spawn_failures.get(language, 0) + 1

    def set_queue_depth(self, n: int) -> None:
        self._queue_depth = n

    def set_ready_workers(self, language: str, n: int) -> None:
        self._ready[language] = n

    def render(self) -> bytes:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP sandboxd_{name} {help_text}")
            lines.append(f"# TYPE sandboxd_{name} {kind}")

        def sample(name: str, labels: tuple[tuple[str, str], ...], value: float) -> None:
            lines.append(f"sandboxd_{name}{_labels(labels)} {_number(value)}")

        family("runs_total", "counter", "Runs answered, by language and status.")
        for (language, status), count in sorted(self._runs.items()):
            sample("runs_total", (("language", language), ("status", status)), count)

        def histograms(name: str, help_text: str, by_language: dict[str, _Histogram]) -> None:
            family(name, "histogram", help_text)
            for language, histogram in sorted(by_language.items()):
                cumulative = 0
                for bound, count in zip(BUCKETS, histogram.counts, strict=True):
                    cumulative += count
                    le = (("language", language), ("le", _number(bound)))
                    sample(f"{name}_bucket", le, cumulative)
                inf = (("language", language), ("le", "+Inf"))
                sample(f"{name}_bucket", inf, histogram.total)
                sample(f"{name}_sum", (("language", language),), histogram.sum)
                sample(f"{name}_count", (("language", language),), histogram.total)

        histograms("run_duration_seconds", "Latency of a run, queue wait included.", self._latency)
        histograms(
            "queue_wait_seconds", "From admission until a worker is in hand.", self._queue_wait
        )

        family("queue_depth", "gauge", "Runs waiting for a worker.")
        sample("queue_depth", (), self._queue_depth)

        family("ready_workers", "gauge", "Warm workers ready for a job, per pool.")
        for language, ready in sorted(self._ready.items()):
            sample("ready_workers", (("language", language),), ready)

        family("busy_slots", "gauge", "Runs holding one of the max_workers slots.")
        sample("busy_slots", (), self._busy_slots)

        family("slots", "gauge", "Slots there are ([limits] max_workers).")
        sample("slots", (), self._slots)

        family("overload_refusals_total", "counter", "Requests refused at admission, by reason.")
        for reason, count in self._refusals.items():
            sample("overload_refusals_total", (("reason", reason),), count)

        family("worker_spawn_failures_total", "counter", "Workers that failed to start.")
        for language, failures in sorted(self._spawn_failures.items()):
            sample("worker_spawn_failures_total", (("language", language),), failures)

        return ("\n".join(lines) + "\n").encode()
