"""Admission: how many requests the daemon takes in at once (running plus waiting).

At most `max_requests` are admitted; beyond that, and while the daemon is
stopping, a request gets a retryable `overloaded` at once. The queue depth
reported is the admitted requests beyond `max_workers` (those that must wait
for a worker slot). The limits are read at each admission, so a reload applies
to the next request.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from sandboxd.config import LimitsConfig
from sandboxd.metrics import Metrics
from sandboxd.protocol import ProtocolError


class Admission:
    """The count of admitted requests, and the refusals beyond it."""

    def __init__(self, limits: Callable[[], LimitsConfig], metrics: Metrics) -> None:
        self._limits = limits
        self._metrics = metrics
        self.admitted = 0
        # Set at stop: new requests are refused (retryable) while in-flight ones finish.
        self.stopping = False
        self._idle = trio.Event()

    def admit(self) -> None:
        """Count one more request in, or raise ProtocolError(overloaded)."""
        if self.stopping:
            self._metrics.refused("stopping")
            raise ProtocolError("overloaded", "the daemon is stopping; retry in a moment")
        if self.admitted >= self._limits().max_requests:
            self._metrics.refused("queue_full")
            raise ProtocolError("overloaded", "too many requests: the queue is full, retry later")
        self.admitted += 1
        self._report()

    def leave(self) -> None:
        """One admitted request is answered (or failed)."""
        self.admitted -= 1
        if not self.admitted:
            self._idle.set()
        self._report()

    async def wait_idle(self) -> None:
        """Until no request is admitted."""
        while self.admitted:
            self._idle = trio.Event()
            await self._idle.wait()

    def _report(self) -> None:
        self._metrics.set_queue_depth(max(0, self.admitted - self._limits().max_workers))
