"""The front ends' bounds, each on one connection over in-memory streams (trio's mock
clock makes timeouts fire as soon as everything waits): auth before any body byte,
the daemon-wide byte budget, the NDJSON writer's send timeout and unsent cap, a
connection cap per listener, and a fault in one request or connection costing it alone."""

from __future__ import annotations

import json
import logging
import socket
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from frontends import FakeService, exchange, http_responses

from sandboxd.budget import ByteBudget
from sandboxd.config import ClientsConfig, Config, HttpConfig
from sandboxd.http import serve_http
from sandboxd.jobs import Job
from sandboxd.metrics import Metrics
from sandboxd.protocol import RequestId, RunResult
from sandboxd.server import ndjson_refusal, serve_listener, serve_ndjson

KEY = "bounds-key"


def config(**clients: int | float) -> Config:
    return Config(http=HttpConfig(api_key=KEY), clients=ClientsConfig(**clients))  # type: ignore[arg-type]


def http(service: FakeService, cfg: Config, budget: ByteBudget | None = None) -> partial[object]:
    return partial(serve_http, service=service, config=cfg, metrics=Metrics(), budget=budget)


def head(key: str, length: int, target: str = "/v1/sandbox/run") -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: t\r\nX-Api-Key: {key}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_wrong_key_is_401_before_any_body_byte_is_read() -> None:
    service = FakeService()
    budget = ByteBudget(10**9)
    # A 16 MiB body is announced and none of it is sent: the answer comes all the same.
    out = exchange(http(service, config(), budget), [head("wrong", 16 * 2**20)], half_close=False)
    [(response, _)] = http_responses(out)
    assert response.status_code == 401
    assert (b"connection", b"close") in response.headers
    assert service.jobs == [] and budget.used == 0


def test_wrong_key_on_native_run_is_401_in_the_native_envelope_before_the_body() -> None:
    out = exchange(http(FakeService(), config()), [head("", 10**6, "/v1/run")], half_close=False)
    [(response, body)] = http_responses(out)
    assert response.status_code == 401
    assert json.loads(body)["error"]["code"] == "unauthorized"


def test_body_past_the_byte_budget_is_503_with_retry_after() -> None:
    budget = ByteBudget(1000)
    body = json.dumps({"language": "python3", "code": "x" * 1500}).encode()
    out = exchange(http(FakeService(), config(), budget), [head(KEY, len(body)) + body])
    [(response, _)] = http_responses(out)
    assert response.status_code == 503
    assert dict(response.headers)[b"retry-after"] == b"1"
    assert budget.used == 0


def test_budget_is_given_back_after_each_request() -> None:
    budget = ByteBudget(2000)  # one body at a time, with its copies
    body = json.dumps({"language": "python3", "code": "x" * 500}).encode()
    request = head(KEY, len(body)) + body
    out = exchange(http(FakeService(), config(), budget), [request, request, request])
    assert [r.status_code for r, _ in http_responses(out)] == [200, 200, 200]
    assert budget.used == 0


def ndjson(service: FakeService, cfg: Config, budget: ByteBudget) -> partial[object]:
    return partial(serve_ndjson, service=service, config=cfg, budget=budget)


def line(code: str, request_id: int = 1) -> bytes:
    return json.dumps({"id": request_id, "language": "python3", "code": code}).encode() + b"\n"


def never_read(serve: partial[object], data: bytes) -> None:
    """Send `data` on a stream that blocks every send until read, and never read."""

    async def main() -> None:
        client, server = trio.testing.lockstep_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, server)
            await client.send_all(data)
        # serve returned: the daemon side gave up on this client.

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_ndjson_client_that_never_reads_is_closed_after_the_send_timeout() -> None:
    budget = ByteBudget(10**6)
    never_read(ndjson(FakeService(), config(send_timeout=5.0), budget), line("print(1)"))
    assert budget.used == 0


def test_ndjson_answers_past_the_unsent_cap_close_the_connection() -> None:
    budget = ByteBudget(10**6)
    cfg = config(send_timeout=10**6, max_unsent_bytes=2000)
    never_read(ndjson(FakeService(), cfg, budget), b"".join(line("y" * 300, n) for n in range(20)))
    assert budget.used == 0


def test_ndjson_request_past_the_byte_budget_is_overloaded_and_the_next_is_served() -> None:
    budget = ByteBudget(2300)
    # One chunk with three lines: the first two (3 copies each) do not fit together.
    data = line("z" * 550, 1) + line("z" * 550, 2) + line("print(3)", 3)
    out = exchange(ndjson(FakeService(), config(), budget), [data])
    answers = {a["id"]: a for a in map(json.loads, out.splitlines())}
    assert answers[1]["status"] == "ok"
    assert answers[2]["error"]["code"] == "overloaded"
    assert answers[2]["error"]["retry_after"] == 1
    assert answers[3]["status"] == "ok"
    assert budget.used == 0


def test_ndjson_unfinished_line_past_the_budget_is_overloaded_then_closed() -> None:
    budget = ByteBudget(1000)
    out = exchange(ndjson(FakeService(), config(), budget), [b'{"code": "' + b"a" * 5000])
    [answer] = map(json.loads, out.splitlines())
    assert answer["error"]["code"] == "overloaded"
    assert budget.used == 0


class BuggyService(FakeService):
    async def run(self, job: Job, request_id: RequestId) -> RunResult:
        if job.code == "bug":
            raise RuntimeError("a bug in the daemon, not the client's doing")
        return await super().run(job, request_id)


def test_a_fault_in_one_ndjson_request_costs_that_request_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    data = line("bug", 1) + b"[" * 5000 + b"\n" + line("print(3)", 3)
    out = exchange(ndjson(BuggyService(), config(), ByteBudget(10**6)), [data])
    answers = [json.loads(raw) for raw in out.splitlines()]
    codes = {a["id"]: a.get("status") or a["error"]["code"] for a in answers}
    assert codes == {1: "internal", None: "bad_request", 3: "ok"}
    assert "request failed inside the daemon" in caplog.text


async def test_listener_past_its_connection_cap_refuses_then_serves_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "s.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    release = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        data = await stream.receive_some(100)
        if data == b"raise":
            raise RuntimeError("a bug in a handler")
        await stream.send_all(b"served " + data)
        await release.wait()

    async def connect_and_say(text: bytes) -> bytes:
        async with await trio.open_unix_socket(path) as stream:
            await stream.send_all(text)
            return bytes(await stream.receive_some(1000))

    refusal = ndjson_refusal(1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_listener, listener, handler, refusal, 1, nursery)
            assert await connect_and_say(b"first") == b"served first"
            assert json.loads(await connect_and_say(b"second"))["error"]["code"] == "overloaded"
            release.set()  # the first connection ends: its slot is free again
            release = trio.Event()
            answer = b""
            while answer != b"served third":  # the slot frees once its handler has returned
                answer = await connect_and_say(b"third")
            release.set()
            # A handler that raises: logged, its connection closed, the listener goes on.
            while (got := await connect_and_say(b"raise")) != b"":
                assert got == refusal  # the third connection's slot was not free yet
            assert await connect_and_say(b"fourth") == b"served fourth"
            nursery.cancel_scope.cancel()
    await listener.aclose()
    assert "a bug in a handler" in caplog.text
