"""The HTTP/1.1 layer over a real loopback TCP socket, driven by raw bytes and by httpx.

The Service is the shared fake (frontends.FakeService), which echoes the code as
stdout, so an answer shows which request it belongs to; the sandbox is not under
test here. ``fail_after`` only guards against a hang: no assertion depends on timing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h11
import httpx
import pytest
import trio
from frontends import FakeService

from sandboxd.config import Config, HttpConfig
from sandboxd.http import ExposureError, check_http_exposure, serve_http
from sandboxd.jobs import Job
from sandboxd.metrics import Metrics
from sandboxd.protocol import RequestId, RunResult

KEY = "test-key"
HANG_GUARD = 10.0


class BrokenService(FakeService):
    async def run(self, job: Job, request_id: RequestId) -> RunResult:
        raise RuntimeError("a bug, not a ProtocolError")


def http_config(**overrides: Any) -> Config:
    settings: dict[str, Any] = {"api_key": KEY, "max_body_bytes": 1000, "header_timeout": 0.5}
    return Config(http=HttpConfig(**{**settings, **overrides}))


class Server:
    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self.url = f"http://127.0.0.1:{port}"


@asynccontextmanager
async def server(
    config: Config | None = None, service: FakeService | None = None
) -> AsyncIterator[Server]:
    handler = partial(
        serve_http, service=service or FakeService(), config=config or http_config(),
        metrics=Metrics(),
    )  # fmt: skip

    async def counted(stream: trio.SocketStream) -> None:
        state.connections += 1
        await handler(stream)

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), counted, 0)
            state = Server(listeners[0].socket.getsockname()[1])
            yield state
            nursery.cancel_scope.cancel()


def run_request(code: str, *, extra: bytes = b"") -> bytes:
    body = json.dumps({"language": "python3", "code": code}).encode()
    return (
        b"POST /v1/sandbox/run HTTP/1.1\r\nHost: t\r\nX-Api-Key: " + KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        + extra + b"\r\n" + body
    )  # fmt: skip


class RawClient:
    """A TCP client that writes raw bytes and parses answers with an h11 client."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.pending = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def response(self, method: bytes = b"POST") -> tuple[h11.Response, bytes]:
        """The next answer on the connection (h11 is told a request went out first)."""
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[(b"host", b"t")]))
        conn.send(h11.EndOfMessage())
        if self.pending:  # (receive_data(b"") would mean end of stream)
            conn.receive_data(self.pending)
        head: h11.Response | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await self.stream.receive_some(65536)))
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                self.pending = conn.trailing_data[0]
                return head, body
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def closed_by_server(self) -> bool:
        """True once the server has closed its side with nothing more sent."""
        rest = self.pending + await self.stream.receive_some(65536)
        return rest == b""


@asynccontextmanager
async def raw(state: Server) -> AsyncIterator[RawClient]:
    stream = await trio.open_tcp_stream("127.0.0.1", state.port)
    async with stream:
        yield RawClient(stream)


def header(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


def envelope(body: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(body)
    return decoded


# --- keep-alive, pipelining, close -----------------------------------------------------


async def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    async with server() as state, httpx.AsyncClient(base_url=state.url) as client:
        for n in range(5):
            answer = await client.post(
                "/v1/sandbox/run",
                json={"language": "python3", "code": f"run {n}", "enable_network": True},
                headers={"X-Api-Key": KEY},
            )
            assert answer.status_code == 200
            assert answer.json()["data"]["stdout"] == f"run {n}"
        assert (await client.get("/health")).text == '"ok"'
    assert state.connections == 1


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with server() as state, raw(state) as client:
        await client.send(run_request("first") + run_request("second") + run_request("third"))
        for code in ("first", "second", "third"):
            head, body = await client.response()
            assert head.status_code == 200
            assert envelope(body)["data"]["stdout"] == code


async def test_connection_close_is_honoured() -> None:
    async with server() as state, raw(state) as client:
        await client.send(run_request("bye", extra=b"Connection: close\r\n"))
        head, body = await client.response()
        assert head.status_code == 200
        assert header(head, b"connection") == b"close"
        assert envelope(body)["data"]["stdout"] == "bye"
        assert await client.closed_by_server()


async def test_http_1_0_gets_one_answer_then_a_close() -> None:
    async with server() as state, raw(state) as client:
        await client.send(b"GET /health HTTP/1.0\r\n\r\n")
        head, body = await client.response(method=b"GET")
        assert (head.status_code, body) == (200, b'"ok"')
        assert await client.closed_by_server()


# --- bodies ----------------------------------------------------------------------------


async def test_a_chunked_body_is_accepted() -> None:
    payload = json.dumps({"language": "python3", "code": "chunked code"}).encode()
    chunks = (
        b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (payload[:10], payload[10:]))
        + b"0\r\n\r\n"
    )
    async with server() as state, raw(state) as client:
        await client.send(
            b"POST /v1/sandbox/run HTTP/1.1\r\nHost: t\r\nX-Api-Key: " + KEY.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks
        )
        head, body = await client.response()
        assert head.status_code == 200
        assert envelope(body)["data"]["stdout"] == "chunked code"


async def test_a_declared_length_over_the_cap_is_413_without_reading_the_body() -> None:
    async with server() as state, raw(state) as client:
        # Only the head is sent: the answer must not wait for the 5000 bytes.
        await client.send(
            b"POST /v1/sandbox/run HTTP/1.1\r\nHost: t\r\nX-Api-Key: " + KEY.encode() + b"\r\n"
            b"Content-Length: 5000\r\n\r\n"
        )
        head, body = await client.response()
        assert head.status_code == 413
        assert header(head, b"connection") == b"close"
        assert envelope(body)["code"] == -413
        assert await client.closed_by_server()


async def test_a_chunked_body_growing_past_the_cap_is_413() -> None:
    async with server() as state, raw(state) as client:
        await client.send(
            b"POST /v1/sandbox/run HTTP/1.1\r\nHost: t\r\nX-Api-Key: " + KEY.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"258\r\n" + b"x" * 600 + b"\r\n"
            + b"258\r\n" + b"x" * 600 + b"\r\n"
        )  # fmt: skip
        head, _ = await client.response()
        assert head.status_code == 413
        assert await client.closed_by_server()


async def test_a_client_still_uploading_a_refused_body_reads_the_413() -> None:
    async with server() as state, httpx.AsyncClient(base_url=state.url) as client:
        answer = await client.post(
            "/v1/sandbox/run", content=b"x" * 2_000_000, headers={"X-Api-Key": KEY}
        )
        assert answer.status_code == 413
        assert (await client.get("/health")).status_code == 200


async def test_the_native_route_answers_413_as_an_error_reply() -> None:
    async with server() as state, httpx.AsyncClient(base_url=state.url) as client:
        answer = await client.post("/v1/run", content=b"x" * 5000, headers={"X-Api-Key": KEY})
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "too_large"


async def test_expect_100_continue_is_answered() -> None:
    async with server() as state, raw(state) as client:
        payload = json.dumps({"language": "python3", "code": "after 100"}).encode()
        await client.send(
            b"POST /v1/sandbox/run HTTP/1.1\r\nHost: t\r\nX-Api-Key: " + KEY.encode() + b"\r\n"
            b"Expect: 100-continue\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n"
        )  # fmt: skip
        interim = await client.stream.receive_some(65536)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await client.send(payload)
        head, body = await client.response()
        assert head.status_code == 200
        assert envelope(body)["data"]["stdout"] == "after 100"


# --- timeouts --------------------------------------------------------------------------


async def test_a_stalled_half_request_is_closed_while_others_are_served() -> None:
    async with server() as state, raw(state) as stalled:
        await stalled.send(b"POST /v1/sandbox/run HTTP/1.1\r\nHost: t\r\nContent-Le")
        async with httpx.AsyncClient(base_url=state.url) as other:
            answer = await other.post(
                "/v1/sandbox/run",
                json={"language": "python3", "code": "served"},
                headers={"X-Api-Key": KEY},
            )
            assert answer.json()["data"]["stdout"] == "served"
        head, _ = await stalled.response()
        assert head.status_code == 408
        assert await stalled.closed_by_server()


async def test_a_stalled_body_is_closed_after_the_header_timeout() -> None:
    async with server() as state, raw(state) as stalled:
        await stalled.send(run_request("x")[:-5])
        head, _ = await stalled.response()
        assert head.status_code == 408
        assert await stalled.closed_by_server()


async def test_a_silent_new_connection_is_closed() -> None:
    async with server() as state, raw(state) as silent:
        assert await silent.closed_by_server()


async def test_an_idle_keep_alive_connection_is_closed_without_an_answer() -> None:
    async with server(http_config(idle_timeout=0.2)) as state, raw(state) as client:
        await client.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = await client.response(method=b"GET")
        assert head.status_code == 200
        assert await client.closed_by_server()


# --- errors ----------------------------------------------------------------------------


async def test_malformed_json_is_400_naming_the_problem() -> None:
    async with server() as state, httpx.AsyncClient(base_url=state.url) as client:
        answer = await client.post(
            "/v1/sandbox/run",
            content=b'{"language": "python3", "code": ',
            headers={"X-Api-Key": KEY},
        )
        assert answer.status_code == 400
        assert answer.json()["code"] == -400
        assert answer.json()["message"].startswith("malformed JSON body")


async def test_a_wrong_type_is_400_naming_the_field() -> None:
    async with server() as state, httpx.AsyncClient(base_url=state.url) as client:
        answer = await client.post(
            "/v1/sandbox/run",
            json={"language": "python3", "code": "x", "enable_network": "false"},
            headers={"X-Api-Key": KEY},
        )
        assert answer.status_code == 400
        assert "enable_network" in answer.json()["message"]


async def test_a_bad_key_is_401_with_an_empty_body() -> None:
    async with server() as state, httpx.AsyncClient(base_url=state.url) as client:
        answer = await client.post(
            "/v1/sandbox/run",
            json={"language": "python3", "code": "x"},
            headers={"X-Api-Key": "no"},
        )
        assert (answer.status_code, answer.content) == (401, b"")
        assert (await client.get("/metrics")).status_code == 401


async def test_metrics_are_served_with_the_key() -> None:
    async with server() as state, httpx.AsyncClient(base_url=state.url) as client:
        answer = await client.get("/metrics", headers={"X-Api-Key": KEY})
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "# TYPE sandboxd_runs_total counter" in answer.text


async def test_garbage_instead_of_http_is_400_and_a_close() -> None:
    async with server() as state, raw(state) as client:
        await client.send(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        head, _ = await client.response()
        assert head.status_code == 400
        assert await client.closed_by_server()


async def test_a_bug_in_a_route_is_500_and_the_server_keeps_serving() -> None:
    async with (
        server(service=BrokenService()) as state,
        httpx.AsyncClient(base_url=state.url) as client,
    ):
        answer = await client.post(
            "/v1/sandbox/run", json={"language": "python3", "code": "x"}, headers={"X-Api-Key": KEY}
        )
        assert answer.status_code == 500
        assert (await client.get("/health")).status_code == 200


class ExplodingStream(trio.abc.Stream):
    """A connection whose every read fails in a way no client should be able to cause."""

    def __init__(self) -> None:
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise RuntimeError("not a client's doing")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        return None

    async def wait_send_all_might_not_block(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closed = True


async def test_an_unexpected_failure_costs_one_connection_not_the_listener() -> None:
    stream = ExplodingStream()
    await serve_http(stream, FakeService(), http_config(), Metrics())  # does not raise
    assert stream.closed


async def test_a_large_answer_arrives_whole() -> None:
    code = "é" * 300_000
    config = http_config(max_body_bytes=2_000_000)
    async with server(config) as state, httpx.AsyncClient(base_url=state.url) as client:
        answer = await client.post(
            "/v1/sandbox/run",
            json={"language": "python3", "code": code},
            headers={"X-Api-Key": KEY},
        )
        assert answer.json()["data"]["stdout"] == code


async def test_head_of_health_is_refused_without_a_body() -> None:
    async with server() as state, raw(state) as client:
        await client.send(b"HEAD /health HTTP/1.1\r\nHost: t\r\n\r\n")
        head, body = await client.response(method=b"HEAD")
        assert (head.status_code, body) == (405, b"")


# --- listen address and exposure -------------------------------------------------------


@pytest.mark.parametrize("key", ["dify-sandbox", ""])
@pytest.mark.parametrize("listen", ["0.0.0.0:8194", "[::]:8194", "10.0.0.5:8194", "sandbox:8194"])
def test_a_public_address_with_the_default_or_no_key_is_refused(listen: str, key: str) -> None:
    with pytest.raises(ExposureError, match="api_key"):
        check_http_exposure(Config(http=HttpConfig(listen=listen, api_key=key)))


@pytest.mark.parametrize(
    ("listen", "key"),
    [
        ("127.0.0.1:8194", "dify-sandbox"),
        ("[::1]:8194", ""),
        ("localhost:8194", "dify-sandbox"),
        ("0.0.0.0:8194", "a-real-secret"),
        ("none", ""),
    ],
)
def test_loopback_or_a_real_key_is_allowed(listen: str, key: str) -> None:
    check_http_exposure(Config(http=HttpConfig(listen=listen, api_key=key)))


def test_a_bad_listen_address_is_refused_clearly() -> None:
    with pytest.raises(ExposureError, match=r"\[http\] listen"):
        check_http_exposure(Config(http=HttpConfig(listen="8194")))
