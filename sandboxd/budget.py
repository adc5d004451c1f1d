"""The bytes that all client connections together may hold ([clients] max_buffered_bytes).

Each front end takes bytes from one ByteBudget before it buffers them (an
unfinished NDJSON line, an HTTP body, a request in flight, an answer not yet
sent) and gives them back when they are gone; a request in flight is charged
for each copy the daemon holds of it (``request_cost``). A take that would pass
the limit is refused, and the front end answers ``overloaded`` instead of growing.
``Holding`` is one owner's share, given back whole when the owner is done, so
a connection that fails in any way cannot keep bytes reserved.
"""

from __future__ import annotations

from types import TracebackType

# A request's bytes are held about three times while it is served: as received, as the
# decoded code, and framed for the worker. A request in flight is charged that many.
REQUEST_COPIES = 3


def request_cost(size: int) -> int:
    """What a request of `size` bytes costs the budget while it is served."""
    return REQUEST_COPIES * size


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        """Reserve `size` bytes; False (and nothing reserved) when they do not fit."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def charge(self, size: int) -> None:
        """Count `size` bytes that exist already (a finished answer), even past the limit:
        until they are gone, new requests are refused instead."""
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


class Holding:
    """One owner's bytes in a ByteBudget; a context manager that gives them all back."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0

    def resize(self, size: int) -> bool:
        """Hold exactly `size` bytes from now on; False (held unchanged) if that does not fit."""
        if size > self.held and not self.budget.take(size - self.held):
            return False
        if size < self.held:
            self.budget.give(self.held - size)
        self.held = size
        return True

    def __enter__(self) -> Holding:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.resize(0)
