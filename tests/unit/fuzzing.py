"""Shared pieces of the hypothesis fuzzers: example counts, JSON-ish strategies, and a
log watcher that turns any error the daemon logs into a failed case.

`make test` runs each fuzzer with a fixed seed and the count it names (a few
seconds each); SANDBOXD_FUZZ_EXAMPLES=N runs N cases per fuzzer with fresh
random seeds, for a longer hunt.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG_RUN = int(os.environ.get("SANDBOXD_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int) -> Any:
    """Settings for one fuzzer: `examples` cases, or SANDBOXD_FUZZ_EXAMPLES of them."""
    return settings(
        max_examples=LONG_RUN or examples,
        derandomize=not LONG_RUN,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
# JSON values of any shape, nesting included.
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
# Values a request field might wrongly get: scalars of every type and flat arrays.
field_values = scalars | st.lists(scalars, max_size=3)

FIELDS = ("id", "language", "code", "stdin", "timeout", "memory_mb", "enable_network",
          "preload", "extra")  # fmt: skip
LANGUAGES = ("python3", "nodejs", "python2", "")


@st.composite
def request_objects(draw: st.DrawFn) -> dict[str, Any]:
    """Objects near a valid run request: right fields with right or wrong values."""
    obj: dict[str, Any] = {}
    if draw(st.booleans()):
        obj["language"] = draw(st.sampled_from(LANGUAGES) | field_values)
    if draw(st.booleans()):
        obj["code"] = draw(st.text(max_size=40) | field_values)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        obj[name] = draw(field_values)
    return obj


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def no_errors_logged() -> Iterator[None]:
    """Fails if the daemon logs an error: a contained exception is still a bug found."""
    recorder = _Recorder()
    logger = logging.getLogger("sandboxd")
    logger.addHandler(recorder)
    try:
        yield
    finally:
        logger.removeHandler(recorder)
    assert not recorder.records, [record.getMessage() for record in recorder.records]
