"""The client pairs answers with requests by id and fails loudly when the peer goes away."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from bench.client import Connection, ConnectionLost, RequestTemplate
from bench.echo import serve, serve_connection
from bench.load import Budget, run_cell
from bench.systems import sandboxd_clients
from bench.workloads import all_workloads

HELLO = RequestTemplate("python3", 'print("hello")\n')


def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    ours, theirs = trio.socket.socketpair()
    return trio.SocketStream(ours), trio.SocketStream(theirs)


def _result(request_id: int, stdout: str) -> bytes:
    body = {"id": request_id, "status": "ok", "stdout": stdout, "stderr": "", "exit_code": 0}
    return json.dumps(body).encode() + b"\n"


async def _read_lines(stream: trio.SocketStream, count: int) -> list[dict[str, object]]:
    data = b""
    while data.count(b"\n") < count:
        chunk = await stream.receive_some(65536)
        assert chunk, "client closed early"
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_request_line_is_one_json_object_with_its_id() -> None:
    line = RequestTemplate("nodejs", "console.log(1)", timeout=2.5).line(7)
    assert line.endswith(b"\n")
    assert json.loads(line) == {
        "id": 7,
        "language": "nodejs",
        "code": "console.log(1)",
        "timeout": 2.5,
    }


async def test_answers_out_of_order_reach_their_own_requests() -> None:
    client, server = _pair()
    first = RequestTemplate("python3", "first")
    second = RequestTemplate("python3", "second")
    got: dict[str, str] = {}

    async def fake_daemon() -> None:
        async with server:
            requests = await _read_lines(server, 2)
            by_code = {str(r["code"]): int(str(r["id"])) for r in requests}
            await server.send_all(
                _result(by_code["second"], "two") + _result(by_code["first"], "one")
            )

    async with Connection(client) as connection:

        async def ask(name: str, template: RequestTemplate) -> None:
            answer, seconds = await connection.request(template)
            assert seconds >= 0
            got[name] = answer.stdout

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_daemon)
            nursery.start_soon(ask, "first", first)
            nursery.start_soon(ask, "second", second)
    assert got == {"first": "one", "second": "two"}


async def test_an_error_reply_is_decoded_with_its_code() -> None:
    client, server = _pair()

    async def fake_daemon() -> None:
        async with server:
            (request,) = await _read_lines(server, 1)
            error = {"code": "unsupported_language", "message": "no node"}
            reply = {"id": request["id"], "error": error}
            await server.send_all(json.dumps(reply).encode() + b"\n")

    async with Connection(client) as connection, trio.open_nursery() as nursery:
        nursery.start_soon(fake_daemon)
        answer, _ = await connection.request(HELLO)
    assert answer.error is not None
    assert answer.error.code == "unsupported_language"
    assert answer.status is None


async def test_a_closed_connection_fails_the_request_in_flight() -> None:
    client, server = _pair()

    async def fake_daemon() -> None:
        await _read_lines(server, 1)
        await server.aclose()

    async with Connection(client) as connection, trio.open_nursery() as nursery:
        nursery.start_soon(fake_daemon)
        with pytest.raises(ConnectionLost, match="closed"):
            await connection.request(HELLO)


async def test_an_answer_with_an_unknown_id_fails_the_connection() -> None:
    client, server = _pair()

    async def fake_daemon() -> None:
        async with server:
            await _read_lines(server, 1)
            await server.send_all(_result(12345, "stray"))

    async with Connection(client) as connection, trio.open_nursery() as nursery:
        nursery.start_soon(fake_daemon)
        with pytest.raises(ConnectionLost, match="unknown id"):
            await connection.request(HELLO)


async def test_the_echo_stand_in_answers_known_code_ok_and_unknown_code_error() -> None:
    client, server = _pair()
    answers = {'print("hello")\n': "hello\n"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, answers)
        async with Connection(client) as connection:
            known, _ = await connection.request(HELLO)
            unknown, _ = await connection.request(RequestTemplate("python3", "1/0"))
    assert (known.status, known.stdout) == ("ok", "hello\n")
    assert unknown.status == "error"


async def test_peer_pid_names_the_process_at_the_other_end() -> None:
    client, server = _pair()
    async with Connection(client) as connection:
        assert connection.peer_pid() == os.getpid()
    await server.aclose()


async def test_clients_sharing_one_connection_all_get_their_own_answers(tmp_path: Path) -> None:
    socket_path = str(tmp_path / "echo.sock")
    hello = next(w for w in all_workloads(10) if w.key == "py-hello")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, socket_path, {hello.code: hello.expected}, 60.0)
        async with sandboxd_clients(socket_path, hello, clients=8, connections=1) as runners:
            tally, _ = await run_cell(runners, Budget(seconds=60.0, runs=200, run_timeout=10.0))
        nursery.cancel_scope.cancel()
    assert len(tally.latencies) == 200
    assert tally.error_count == 0


async def test_a_late_answer_to_an_abandoned_request_leaves_the_connection_usable(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = _pair()
    async with server, Connection(client) as connection:
        with trio.move_on_after(5) as scope:  # virtual time: the daemon stays silent
            await connection.request(HELLO)
        assert scope.cancelled_caught
        (abandoned,) = await _read_lines(server, 1)
        async with trio.open_nursery() as nursery:

            async def fake_daemon() -> None:
                (current,) = await _read_lines(server, 1)
                late = _result(int(str(abandoned["id"])), "late")
                await server.send_all(late + _result(int(str(current["id"])), "hello\n"))

            nursery.start_soon(fake_daemon)
            answer, _ = await connection.request(HELLO)
    assert answer.stdout == "hello\n"
