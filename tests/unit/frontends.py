"""An in-memory client for the front ends: drive serve_ndjson or serve_http over a trio
memory stream pair with the fake Service (FakeService), on trio's mock clock (timeouts fire at once
when everything waits), and collect every byte the server wrote until it closed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import msgspec
import trio
import trio.testing

from sandboxd.jobs import Dependency, Job
from sandboxd.protocol import Language, ProtocolError, RequestId, RunResult


class FakeService:
    """The front ends' one fake Service (jobs.Service): it records every job and sync.
    A run is answered with `answer` (a canned RunResult, or a ProtocolError raised);
    without one, with its code as stdout, and code "overloaded" or "internal" is
    refused with that error."""

    def __init__(
        self,
        answer: RunResult | ProtocolError | None = None,
        deps: list[Dependency] | None = None,
        sync_error: ProtocolError | None = None,
    ) -> None:
        self.answer = answer
        self.deps = deps if deps is not None else [Dependency("jinja2", "3.1.2")]
        self.sync_error = sync_error
        self.jobs: list[tuple[Job, RequestId]] = []
        self.synced: list[Language] = []
        # What why_unavailable() reports (None: the daemon can take a run).
        self.down: str | None = None

    async def run(self, job: Job, request_id: RequestId) -> RunResult:
        self.jobs.append((job, request_id))
        if isinstance(self.answer, ProtocolError):
            raise self.answer
        if self.answer is not None:
            return msgspec.structs.replace(self.answer, id=request_id)
        if job.code in ("overloaded", "internal"):
            raise ProtocolError(job.code, "refused by the fake service")
        return RunResult(
            id=request_id, status="ok", exit_code=0, signal=None, stdout=job.code, stderr="",
            truncated=False, wall_ms=1.0, cpu_ms=1.0, peak_memory_bytes=None,
        )  # fmt: skip

    async def dependencies(self, language: Language) -> list[Dependency]:
        return self.deps

    async def sync_dependencies(self, language: Language) -> None:
        self.synced.append(language)
        if self.sync_error is not None:
            raise self.sync_error

    def why_unavailable(self) -> str | None:
        return self.down


Serve = Callable[[trio.abc.Stream], Awaitable[None]]


def exchange(serve: Serve, chunks: list[bytes], *, half_close: bool = True) -> bytes:
    """Send `chunks` (then end of file), read until the server closes; its bytes."""

    async def main() -> bytes:
        client, server = trio.testing.memory_stream_pair()
        received = bytearray()

        async def send() -> None:
            try:
                for chunk in chunks:
                    await client.send_all(chunk)
                if half_close:
                    await client.send_eof()
            except trio.BrokenResourceError:
                pass  # the server closed first: it refused what we sent

        async def receive() -> None:
            while data := await client.receive_some(65536):
                received.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, server)
            nursery.start_soon(send)
            nursery.start_soon(receive)
        return bytes(received)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def http_responses(data: bytes) -> list[tuple[h11.Response, bytes]]:
    """Every HTTP answer in `data`, parsed by an h11 client; trailing bytes are an error."""
    answers: list[tuple[h11.Response, bytes]] = []
    while data:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=b"POST", target=b"/", headers=[(b"host", b"t")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(data)
        conn.receive_data(b"")
        head: h11.Response | None = None
        body = bytearray()
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            assert event is not h11.NEED_DATA, f"a truncated answer: {data!r}"
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
        assert head is not None
        answers.append((head, bytes(body)))
        data = conn.trailing_data[0]
    return answers
