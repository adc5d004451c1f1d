"""A lean native-protocol client: NDJSON over a Unix socket, many requests in flight.

Cost matters here (the client shares two cores with the daemon): request lines
are pre-encoded once per workload and only the id is spliced in; one reader
task per connection splits answers, stamps their arrival time and hands each to
the waiting request by id. Latency is measured from just before the send to the
moment the answer's line was read, so scheduling of the waiting task is not
counted.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from types import TracebackType

import msgspec
import trio

from sandboxd.protocol import LineBuffer, LineTooLong

# An answer line may carry up to the daemon's output cap plus JSON escaping.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
_READ_SIZE = 256 * 1024


class ErrorInfo(msgspec.Struct):
    code: str
    message: str = ""


class Answer(msgspec.Struct):
    """Either a result or a protocol error; lenient, so new daemon fields do no harm."""

    id: int | str | None = None
    status: str | None = None
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    signal: int | None = None
    wall_ms: float | None = None
    cpu_ms: float | None = None
    peak_memory_bytes: int | None = None
    error: ErrorInfo | None = None


_decoder = msgspec.json.Decoder(Answer)


class ConnectionLost(Exception):
    """The daemon closed the connection or sent something that is not an answer."""


class RequestTemplate:
    """A request line with a slot for its id: encoded once, sent many times."""

    def __init__(self, language: str, code: str, timeout: float | None = None) -> None:
        body: dict[str, object] = {"language": language, "code": code}
        if timeout is not None:
            body["timeout"] = timeout
        encoded = json.dumps(body, separators=(",", ":")).encode()
        self._tail = b"," + encoded[1:] + b"\n"

    def line(self, request_id: int) -> bytes:
        return b'{"id":' + str(request_id).encode() + self._tail


class _Pending:
    __slots__ = ("answer", "arrived", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.answer: Answer | None = None
        self.arrived = 0.0


class Connection:
    """One Unix-socket connection; use inside a nursery via `async with`."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        # Requests given up on (client timeout): their late answers are dropped.
        self._abandoned: set[int] = set()
        self._next_id = 0
        self._lost: str | None = None
        self._nursery_manager = trio.open_nursery()
        self._nursery: trio.Nursery | None = None

    @classmethod
    async def open(cls, path: str) -> Connection:
        return cls(await trio.open_unix_socket(path))

    async def __aenter__(self) -> Connection:
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._read_answers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_manager.__aexit__(exc_type, exc, tb)
        finally:
            await self._stream.aclose()

    def peer_pid(self) -> int:
        """Pid of the process that listens on the socket (SO_PEERCRED)."""
        creds = self._stream.socket.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
        pid, _uid, _gid = struct.unpack("3i", creds)
        return int(pid)

    async def request(self, template: RequestTemplate) -> tuple[Answer, float]:
        """Send one request and wait for its answer; returns it and its latency in s."""
        if self._lost is not None:
            raise ConnectionLost(self._lost)
        request_id = self._next_id
        self._next_id += 1
        pending = _Pending()
        self._pending[request_id] = pending
        line = template.line(request_id)
        sent = False
        try:
            async with self._send_lock:
                start = time.perf_counter()
                try:
                    await self._stream.send_all(line)
                    sent = True
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ConnectionLost(f"send failed: {exc!r}") from exc
            await pending.event.wait()
        finally:
            del self._pending[request_id]
            if sent and not pending.event.is_set():
                self._abandoned.add(request_id)
        if pending.answer is None:
            raise ConnectionLost(self._lost or "connection lost")
        return pending.answer, pending.arrived - start

    async def _read_answers(self) -> None:
        buffer = LineBuffer(MAX_ANSWER_BYTES)
        try:
            while True:  # ends at EOF, on a bad line, or when __aexit__ cancels it
                data = await self._stream.receive_some(_READ_SIZE)
                if not data:
                    self._fail("the daemon closed the connection")
                    return
                arrived = time.perf_counter()
                for line in buffer.feed(data):
                    self._deliver(line, arrived)
        except LineTooLong:
            self._fail(f"answer longer than {MAX_ANSWER_BYTES} bytes")
        except msgspec.DecodeError as exc:
            self._fail(f"answer is not a valid result: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(f"receive failed: {exc!r}")

    def _deliver(self, line: bytes, arrived: float) -> None:
        answer = _decoder.decode(line)
        if isinstance(answer.id, int) and answer.id in self._abandoned:
            self._abandoned.discard(answer.id)
            return
        if not isinstance(answer.id, int) or answer.id not in self._pending:
            raise msgspec.DecodeError(f"answer with an unknown id: {line[:200]!r}")
        pending = self._pending[answer.id]
        pending.answer = answer
        pending.arrived = arrived
        pending.event.set()

    def _fail(self, reason: str) -> None:
        self._lost = reason
        for pending in self._pending.values():
            pending.event.set()
