"""The daemon's counters, rendered in the Prometheus text format 0.0.4.

Pure: callers tell it what happened, ``render()`` gives bytes; no I/O, no
prometheus_client. Series (all names prefixed ``sandboxd_``):

  runs_total{language,status}              counter: runs answered, by RunResult status
                                           or the ProtocolError code that refused them
  run_duration_seconds{language}           histogram: request latency of a run
  queue_depth                              gauge: runs waiting for a worker
  ready_workers{language}                  gauge: warm workers ready for a job
  worker_spawn_failures_total{language}    counter: workers that failed to start
"""

from __future__ import annotations

from collections import defaultdict

from sandboxd.protocol import LANGUAGES

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
        self._queue_depth = 0
        self._ready: dict[str, int] = {}
        # Present at zero from the start, so rate() and alerts work before a failure.
        self._spawn_failures: dict[str, int] = dict.fromkeys(LANGUAGES, 0)

    def observe_run(self, language: str, status: str, seconds: float) -> None:
        self._runs[(language, status)] += 1
        self._latency.setdefault(language, _Histogram()).observe(seconds)

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

        family("run_duration_seconds", "histogram", "Latency of a run, queue wait included.")
        for language, histogram in sorted(self._latency.items()):
            cumulative = 0
            for bound, count in zip(BUCKETS, histogram.counts, strict=True):
                cumulative += count
                le = (("language", language), ("le", _number(bound)))
                sample("run_duration_seconds_bucket", le, cumulative)
            inf = (("language", language), ("le", "+Inf"))
            sample("run_duration_seconds_bucket", inf, histogram.total)
            sample("run_duration_seconds_sum", (("language", language),), histogram.sum)
            sample("run_duration_seconds_count", (("language", language),), histogram.total)

        family("queue_depth", "gauge", "Runs waiting for a worker.")
        sample("queue_depth", (), self._queue_depth)

        family("ready_workers", "gauge", "Warm workers ready for a job, per pool.")
        for language, ready in sorted(self._ready.items()):
            sample("ready_workers", (("language", language),), ready)

        family("worker_spawn_failures_total", "counter", "Workers that failed to start.")
        for language, failures in sorted(self._spawn_failures.items()):
            sample("worker_spawn_failures_total", (("language", language),), failures)

        return ("\n".join(lines) + "\n").encode()
