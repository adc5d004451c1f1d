"""Red team: the daemon's front doors (DESIGN.md invariants 14 and 17).

- HTTP request smuggling around the X-Api-Key check: a request without the key
  hidden in, behind or around another request's framing (Content-Length and
  Transfer-Encoding together, two Content-Lengths, obfuscated chunking, a body
  longer than announced, pipelining past a 401, the key sent in a chunked
  trailer, Expect: 100-continue without a key). The hidden request would run code
  whose output spells the marker; no answer may hold it.
- NDJSON ids: the same id many times on one connection (every request is still
  answered), ids past 64 bits, ids nested too deeply to salvage.
- File descriptors: more idle HTTP connections than the cap; the native socket
  serves meanwhile, the one past the cap reads 503, and the daemon gives back
  every descriptor when they go.
- Numbers and strings at their edges: timeouts of 1e308, 1e-300 and 1e400, memory
  past 64 bits, NUL in code, a 1 MB stdin; body sizes past any integer.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from tests.integration.conftest import Daemon
from tests.integration.tenants import MARKER
from tests.integration.test_native_protocol import _exchange as exchange_lines

# Code whose output is the marker, though the marker is not in its text.
RUN_BODY = json.dumps(
    {"language": "python3", "code": f"print({MARKER[:4]!r} + {MARKER[4:]!r})"}
).encode()


def _post(
    extra_headers: bytes, body: bytes = RUN_BODY, target: bytes = b"/v1/sandbox/run"
) -> bytes:
    """A run request without X-Api-Key (unless `extra_headers` brings one)."""
    return (
        b"POST "
        + target
        + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + extra_headers
        + b"\r\n"
        + body
    )


def _chunked(body: bytes, trailer: bytes = b"") -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n" + trailer + b"\r\n"


HIDDEN = _post(b"Content-Length: %d\r\n" % len(RUN_BODY))

SMUGGLING: dict[str, bytes] = {
    # Content-Length covers the hidden request, chunked framing ends before it.
    "cl-and-te": _post(
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(HIDDEN)),
        b"0\r\n\r\n" + HIDDEN,
    ),
    "two-content-lengths": _post(
        b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(HIDDEN), HIDDEN
    ),
    "te-obfuscated": _post(b"Transfer-Encoding: xchunked\r\n", _chunked(HIDDEN)),
    "te-identity-then-chunked": _post(
        b"Transfer-Encoding: identity, chunked\r\n", _chunked(HIDDEN)
    ),
    "te-with-space-before-colon": _post(b"Transfer-Encoding : chunked\r\n", _chunked(HIDDEN)),
    "body-longer-than-announced": _post(b"Content-Length: 2\r\n", b"{}" + HIDDEN),
    "pipelined-after-a-401": b"GET /v1/sandbox/dependencies HTTP/1.1\r\nHost: x\r\n\r\n" + HIDDEN,
    "key-in-a-chunked-trailer": _post(
        b"Transfer-Encoding: chunked\r\n", _chunked(RUN_BODY, b"X-Api-Key: KEY\r\n")
    ),
    "expect-100-continue": _post(b"Expect: 100-continue\r\nContent-Length: %d\r\n" % len(RUN_BODY)),
    "absolute-form-target": _post(
        b"Content-Length: %d\r\n" % len(RUN_BODY), target=b"http://x/v1/sandbox/run"
    ),
    "health-path-with-dots": _post(
        b"Content-Length: %d\r\n" % len(RUN_BODY), target=b"/health/../v1/sandbox/run"
    ),
}


def _exchange(daemon: Daemon, raw: bytes) -> bytes:
    """Send raw bytes to the HTTP port; everything the daemon sends until it closes."""
    host, port = daemon.http_url.removeprefix("http://").rsplit(":", 1)
    received = bytearray()
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(raw.replace(b"KEY", daemon.api_key.encode()))
        sock.shutdown(socket.SHUT_WR)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return bytes(received)


@pytest.mark.parametrize("raw", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_no_request_runs_without_the_key_whatever_its_framing(daemon: Daemon, raw: bytes) -> None:
    answer = _exchange(daemon, raw)
    assert answer.startswith(b"HTTP/1.1 "), answer  # every case gets an HTTP answer
    assert MARKER.encode() not in answer, answer
    assert b"HTTP/1.1 200" not in answer, answer
    daemon.assert_healthy()


def test_the_same_request_with_the_key_does_run(daemon: Daemon) -> None:
    """The control: the code of the hidden request prints the marker when it runs."""
    answer = _exchange(daemon, _post(b"X-Api-Key: KEY\r\nContent-Length: %d\r\n" % len(RUN_BODY)))
    assert b"HTTP/1.1 200" in answer and MARKER.encode() in answer, answer


# --- NDJSON ids ------------------------------------------------------------------------


def _ndjson(daemon: Daemon, lines: list[bytes], answers: int) -> list[dict[str, object]]:
    """Send the lines on one connection; read `answers` answers."""
    return exchange_lines(daemon, b"".join(line + b"\n" for line in lines), answers)


def test_one_id_used_by_many_requests_at_once_gets_every_answer(daemon: Daemon) -> None:
    run = json.dumps({"id": "same", "language": "python3", "code": "print('once')"}).encode()
    answers = _ndjson(daemon, [run] * 6, 6)
    assert [answer["id"] for answer in answers] == ["same"] * 6, answers
    assert all(answer["stdout"] == "once\n" for answer in answers), answers


def test_ids_past_64_bits_and_too_deep_to_salvage_get_typed_answers(daemon: Daemon) -> None:
    huge = 2**80
    deep = b'{"id": ' + b"[" * 5000 + b"]" * 5000 + b', "language": "python3", "code": ""}'
    lines = [
        json.dumps({"id": huge, "language": "python3", "code": "print(1)"}).encode(),
        json.dumps({"id": -huge, "language": 1}).encode(),
        deep,
        b'{"id": 1e400, "language": "python3", "code": ""}',
        json.dumps({"id": "last", "language": "python3", "code": "print(2)"}).encode(),
    ]
    answers = {str(answer.get("id")): answer for answer in _ndjson(daemon, lines, len(lines))}
    assert answers[str(huge)]["stdout"] == "1\n", answers
    assert answers[str(-huge)]["error"]["code"] == "bad_request", answers  # type: ignore[index]
    assert answers["last"]["stdout"] == "2\n", answers
    assert len(answers) == 4, answers  # the deep and the 1e400 ids are unsalvageable: null
    daemon.assert_healthy()


# --- file descriptors ------------------------------------------------------------------


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled_fd_count(pid: int) -> int:
    """The daemon's fd count once its pools are full: unchanged for 2 s. Each ready
    worker holds five of its fds, and the data-science pool warms up slowly."""
    deadline = time.monotonic() + 120
    seen = [_fd_count(pid)]
    while len(seen) < 8 or len(set(seen[-8:])) > 1:
        assert time.monotonic() < deadline, f"the daemon's fds never settled: {seen[-8:]}"
        time.sleep(0.25)
        seen.append(_fd_count(pid))
    return seen[-1]


def test_idle_connections_past_the_cap_cost_no_descriptors_and_no_service(daemon: Daemon) -> None:
    host, port = daemon.http_url.removeprefix("http://").rsplit(":", 1)
    daemon.assert_healthy()
    before = _settled_fd_count(daemon.process.pid)
    idle = [socket.create_connection((host, int(port))) for _ in range(300)]  # cap: 256
    try:
        # The connections past the cap were refused: one of them reads 503 and a close.
        idle[-1].settimeout(15)
        assert idle[-1].recv(4096).startswith(b"HTTP/1.1 503"), "no 503 past the cap"
        daemon.assert_healthy()  # the native socket serves meanwhile
        assert _fd_count(daemon.process.pid) <= before + 256 + 16
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30
    while _fd_count(daemon.process.pid) > before + 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _fd_count(daemon.process.pid) <= before + 8, "descriptors stayed behind"
    daemon.assert_healthy()


# --- numbers and strings at their edges ------------------------------------------------

EDGES = [
    b'{"language": "python3", "code": "print(1)", "timeout": 1e308}',
    b'{"language": "python3", "code": "import time; time.sleep(5)", "timeout": 1e-300}',
    b'{"language": "python3", "code": "print(1)", "timeout": 1e400}',
    b'{"language": "python3", "code": "print(1)", "memory_mb": 9223372036854775808}',
    b'{"language": "python3", "code": "print(1)", "memory_mb": 184467440737095516160}',
    b'{"language": "python3", "code": "print(1)\\u0000print(2)"}',
    b'{"language": "nodejs", "code": "console.log(1)\\u0000"}',
    b'{"language": "python3", "code": "print(len(input()))", "stdin": "' + b"x" * 1_000_000 + b'"}',
]


def test_numbers_and_strings_at_their_edges_get_typed_answers(daemon: Daemon) -> None:
    lines = [b'{"id": %d, ' % index + line[1:] for index, line in enumerate(EDGES)]
    answers = {answer["id"]: answer for answer in _ndjson(daemon, lines, len(lines))}
    assert set(answers) == set(range(len(EDGES))), answers  # every line answered, by its id
    for answer in answers.values():
        assert "status" in answer or answer["error"]["code"] == "bad_request", answer  # type: ignore[index]
    assert answers[0]["status"] == "ok" and answers[1]["status"] == "timeout", answers
    assert answers[len(EDGES) - 1]["stdout"] == "1000000\n", answers
    daemon.assert_healthy()


OVERSIZED = {
    "content-length-past-64-bits": _post(
        b"X-Api-Key: KEY\r\nContent-Length: 99999999999999999999999\r\n", b""
    ),
    "chunk-size-past-64-bits": _post(
        b"X-Api-Key: KEY\r\nTransfer-Encoding: chunked\r\n", b"FFFFFFFFFFFFFFFFFFFFFF\r\nx"
    ),
    "negative-content-length": _post(b"X-Api-Key: KEY\r\nContent-Length: -1\r\n", b""),
}


@pytest.mark.parametrize("raw", OVERSIZED.values(), ids=OVERSIZED.keys())
def test_body_sizes_past_any_integer_are_refused_by_status(daemon: Daemon, raw: bytes) -> None:
    answer = _exchange(daemon, raw)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    assert status in (400, 413), answer
    daemon.assert_healthy()
