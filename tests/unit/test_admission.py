"""Admission (admission.py): at most max_requests in, none while stopping, as counted
and refused by the real Admission and Metrics (the pool behind it is not needed)."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.admission import Admission
from sandboxd.config import LimitsConfig
from sandboxd.metrics import Metrics
from sandboxd.protocol import ProtocolError


def sample(metrics: Metrics, name: str) -> str:
    lines = metrics.render().decode().splitlines()
    return next(line for line in lines if line.startswith(f"sandboxd_{name}"))


def test_requests_beyond_max_requests_are_refused_and_counted() -> None:
    metrics = Metrics()
    admission = Admission(lambda: LimitsConfig(max_workers=2, max_requests=3), metrics)
    for _ in range(3):
        admission.admit()
    assert admission.admitted == 3
    assert sample(metrics, "queue_depth") == "sandboxd_queue_depth 1"
    with pytest.raises(ProtocolError) as refused:
        admission.admit()
    assert refused.value.code == "overloaded"
    assert admission.admitted == 3
    assert sample(metrics, 'overload_refusals_total{reason="queue_full"}').endswith(" 1")
    admission.leave()
    admission.admit()
    assert admission.admitted == 3


def test_a_stopping_daemon_refuses_even_with_room() -> None:
    metrics = Metrics()
    admission = Admission(lambda: LimitsConfig(), metrics)
    admission.stopping = True
    with pytest.raises(ProtocolError) as refused:
        admission.admit()
    assert (refused.value.code, admission.admitted) == ("overloaded", 0)
    assert sample(metrics, 'overload_refusals_total{reason="stopping"}').endswith(" 1")


def test_a_reload_applies_to_the_next_admission() -> None:
    limits = [LimitsConfig(max_workers=1, max_requests=1)]
    admission = Admission(lambda: limits[0], Metrics())
    admission.admit()
    with pytest.raises(ProtocolError):
        admission.admit()
    limits[0] = LimitsConfig(max_workers=1, max_requests=2)
    admission.admit()
    assert admission.admitted == 2


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 8))
def test_the_count_never_passes_max_requests(steps: list[bool], max_requests: int) -> None:
    admission = Admission(lambda: LimitsConfig(max_requests=max_requests), Metrics())
    for enter in steps:
        if enter:
            try:
                admission.admit()
            except ProtocolError:
                assert admission.admitted == max_requests
        elif admission.admitted:
            admission.leave()
        assert 0 <= admission.admitted <= max_requests


async def test_wait_idle_returns_once_the_last_request_leaves() -> None:
    admission = Admission(lambda: LimitsConfig(), Metrics())
    admission.admit()
    admission.admit()
    left = []

    async def finish() -> None:
        await trio.sleep(0.01)
        admission.leave()
        left.append(1)
        await trio.sleep(0.01)
        admission.leave()
        left.append(2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish)
        await admission.wait_idle()
        assert left == [1, 2] and admission.admitted == 0
