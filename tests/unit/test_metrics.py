"""Metrics render the Prometheus text format 0.0.4 with the values they were told."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sandboxd.metrics import BUCKETS, REFUSAL_REASONS, Metrics

# One sample line of the text format: name, optional {labels}, a number.
SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? '
    r"(-?[0-9.e+-]+|\+Inf|NaN)$"
)


def samples(metrics: Metrics) -> dict[str, float]:
    """The rendered samples by their series text, after checking every line's grammar."""
    text = metrics.render().decode()
    assert text.endswith("\n")
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.match(r"^# (HELP|TYPE) sandboxd_\w+ .+$", line), line
            continue
        assert SAMPLE.match(line), line
        series, value = line.rsplit(" ", 1)
        values[series] = float(value)
    return values


def test_a_fresh_registry_renders_zeroes_and_types() -> None:
    text = Metrics().render().decode()
    assert "# TYPE sandboxd_runs_total counter" in text
    assert "# TYPE sandboxd_run_duration_seconds histogram" in text
    assert "# TYPE sandboxd_queue_depth gauge" in text
    assert "# TYPE sandboxd_ready_workers gauge" in text
    assert "# TYPE sandboxd_worker_spawn_failures_total counter" in text
    values = samples(Metrics())
    assert values["sandboxd_queue_depth"] == 0
    assert values['sandboxd_worker_spawn_failures_total{language="python3"}'] == 0
    assert values['sandboxd_worker_spawn_failures_total{language="nodejs"}'] == 0


def test_runs_are_counted_by_language_and_status() -> None:
    metrics = Metrics()
    metrics.observe_run("python3", "ok", 0.002)
    metrics.observe_run("python3", "ok", 0.003)
    metrics.observe_run("python3", "timeout", 15.0)
    metrics.observe_run("nodejs", "error", 0.004)
    values = samples(metrics)
    assert values['sandboxd_runs_total{language="python3",status="ok"}'] == 2
    assert values['sandboxd_runs_total{language="python3",status="timeout"}'] == 1
    assert values['sandboxd_runs_total{language="nodejs",status="error"}'] == 1


def test_latency_histogram_is_cumulative_with_sum_and_count() -> None:
    metrics = Metrics()
    for seconds in (0.0005, 0.002, 0.002, 7.0, 100.0):
        metrics.observe_run("python3", "ok", seconds)
    values = samples(metrics)

    def bucket(le: str) -> float:
        return values[f'sandboxd_run_duration_seconds_bucket{{language="python3",le="{le}"}}']

    assert bucket("0.001") == 1
    assert bucket("0.0025") == 3
    assert bucket("5.0") == 3
    assert bucket("10.0") == 4
    assert bucket("60.0") == 4
    assert bucket("+Inf") == 5
    counts = [bucket(repr(bound)) for bound in BUCKETS]
    assert counts == sorted(counts)
    assert values['sandboxd_run_duration_seconds_count{language="python3"}'] == 5
    assert values['sandboxd_run_duration_seconds_sum{language="python3"}'] == pytest.approx(
        107.0045
    )


def test_gauges_hold_the_last_value_set() -> None:
    metrics = Metrics()
    metrics.set_queue_depth(7)
    metrics.set_queue_depth(3)
    metrics.set_ready_workers("python3", 4)
    metrics.set_ready_workers("nodejs", 2)
    metrics.set_ready_workers("python3", 3)
    values = samples(metrics)
    assert values["sandboxd_queue_depth"] == 3
    assert values['sandboxd_ready_workers{language="python3"}'] == 3
    assert values['sandboxd_ready_workers{language="nodejs"}'] == 2


def test_spawn_failures_count_up() -> None:
    metrics = Metrics()
    metrics.spawn_failed("nodejs")
    metrics.spawn_failed("nodejs")
    assert samples(metrics)['sandboxd_worker_spawn_failures_total{language="nodejs"}'] == 2


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.observe_run('py"3\\\n', "ok", 0.1)
    assert 'language="py\\"3\\\\\\n"' in metrics.render().decode()
    samples(metrics)  # and every line still parses


def test_queue_wait_is_a_histogram_per_language() -> None:
    metrics = Metrics()
    metrics.observe_queue_wait("nodejs", 0.0001)
    metrics.observe_queue_wait("nodejs", 0.3)
    values = samples(metrics)
    assert values['sandboxd_queue_wait_seconds_bucket{language="nodejs",le="0.001"}'] == 1
    assert values['sandboxd_queue_wait_seconds_bucket{language="nodejs",le="0.5"}'] == 2
    assert values['sandboxd_queue_wait_seconds_count{language="nodejs"}'] == 2
    assert values['sandboxd_queue_wait_seconds_sum{language="nodejs"}'] == pytest.approx(0.3001)
    assert "# TYPE sandboxd_queue_wait_seconds histogram" in metrics.render().decode()


def test_slots_and_refusals_by_reason() -> None:
    metrics = Metrics()
    fresh = samples(metrics)
    series = 'sandboxd_overload_refusals_total{{reason="{}"}}'
    refusals = {reason: fresh[series.format(reason)] for reason in REFUSAL_REASONS}
    assert refusals == {"queue_full": 0, "stopping": 0}
    metrics.set_slots(3, 4)
    metrics.refused("queue_full")
    metrics.refused("queue_full")
    metrics.refused("stopping")
    values = samples(metrics)
    assert values["sandboxd_busy_slots"] == 3
    assert values["sandboxd_slots"] == 4
    assert values['sandboxd_overload_refusals_total{reason="queue_full"}'] == 2
    assert values['sandboxd_overload_refusals_total{reason="stopping"}'] == 1


ALERTS = Path(__file__).parents[2] / "etc" / "prometheus" / "sandboxd-alerts.yml"


def test_the_shipped_alert_fires_on_a_series_the_daemon_serves() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    (group,) = rules["groups"]
    (rule,) = group["rules"]
    assert rule["alert"] == "SandboxdNoReadyWorkers"
    assert rule["labels"]["severity"] == "critical"
    assert set(rule["annotations"]) == {"summary", "description"}
    metrics = Metrics()
    metrics.set_ready_workers("python3", 0)
    lines = metrics.render().decode().splitlines()
    served = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in lines if not line.startswith("#")}
    named = set(re.findall(r"\bsandboxd_\w+", rule["expr"] + rule["annotations"]["description"]))
    assert named and named <= served, named - served
    assert "sandboxd_ready_workers" in rule["expr"]
