"""Input that used to kill the daemon or swell its memory, against a real daemon
(DESIGN invariant 17). Each test asserts that a concurrent client is served while
the bad input goes on, and that the daemon is still up afterwards; the floods
also read the daemon's own VmRSS from /proc and hold it to 200 MB.

No assertion depends on timing: waits are bounded by HANG_GUARD only so that a
hang fails instead of blocking the run.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from tests.integration.conftest import Daemon, start_daemon, stop_daemon

HANG_GUARD = 120.0
RSS_BOUND = 200 * 10**6  # bytes (DESIGN: <= 200 MB under any flood)
CONNECTION_CAP = 40
# [http] first (start_daemon writes it last), then the sections of this file's bounds.
CONFIG = f"""
header_timeout = 4.0
[clients]
max_connections = {CONNECTION_CAP}
send_timeout = 3.0
[network]
mode = "reject"
"""


@pytest.fixture(scope="module")
def robust(tmp_path_factory: pytest.TempPathFactory, python_deps_state: str) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("robust"), CONFIG, state_dir=python_deps_state)
    yield daemon
    stop_daemon(daemon)
    assert daemon.process.returncode == 0, daemon.log_path.read_text()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Watch:
    """What happened beside the bad input: peak RSS, and the concurrent client's runs."""

    peak_rss: int = 0
    served: int = 0
    failures: list[str] = field(default_factory=list)


@contextmanager
def served_meanwhile(daemon: Daemon, route: str = "ndjson") -> Iterator[Watch]:
    """A good client running hello-world in a loop, and an RSS sampler, for the block."""
    watch = Watch(peak_rss=rss_bytes(daemon.process.pid))
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            try:
                if route == "ndjson":
                    answer = daemon.run("print('good client')")
                    ok = answer.get("stdout") == "good client\n"
                else:
                    answer = native_http(daemon, {"language": "python3", "code": "print(1)"})
                    ok = answer.status_code == 200 and answer.json()["stdout"] == "1\n"
            except (OSError, httpx.HTTPError) as error:
                watch.failures.append(repr(error))
                continue
            if ok:
                watch.served += 1
            else:
                watch.failures.append(str(answer))

    def sampler() -> None:
        while not done.is_set():
            watch.peak_rss = max(watch.peak_rss, rss_bytes(daemon.process.pid))
            time.sleep(0.005)

    threads = [threading.Thread(target=client), threading.Thread(target=sampler)]
    for thread in threads:
        thread.start()
    try:
        yield watch
        # The good client must have been served while the bad input was still going on.
        deadline = time.monotonic() + HANG_GUARD
        while watch.served == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert watch.failures == []
    assert watch.served > 0
    daemon.assert_healthy()


def at_once(count: int, target: Callable[..., None], *args: object) -> None:
    """`count` threads running target(*args) at the same time, until all are done."""
    threads = [threading.Thread(target=target, args=args) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def native_http(daemon: Daemon, body: object, key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{daemon.http_url}/v1/run",
        content=body if isinstance(body, bytes) else json.dumps(body),
        headers={"X-Api-Key": daemon.api_key if key is None else key},
        timeout=HANG_GUARD,
    )


def ndjson_lines(daemon: Daemon, payload: bytes, answers: int) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(HANG_GUARD)
        sock.connect(daemon.socket_path)
        sock.sendall(payload)
        data = bytearray()
        while data.count(b"\n") < answers and (chunk := sock.recv(65536)):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


# The line of issue 10 (2.2 KB), and far deeper ones in every kind of field.
ISSUE_LINE = b'{"language":"python3","code":' + b"[" * 1100 + b"]" * 1100 + b"}"
DEEP = b"[" * 200_000 + b"]" * 200_000
DEEP_LINES = [
    ISSUE_LINE,
    b'{"id": 1, "language": "python3", "code": ' + DEEP + b"}",
    b'{"id": 2, "extra": ' + DEEP + b"}",
    b'{"id": 3, "language": "python3", "code": "1", "extra": ' + b'{"a":' * 100_000 + b"}",
    DEEP,
]


def test_deeply_nested_lines_get_bad_request_and_the_daemon_serves(robust: Daemon) -> None:
    with served_meanwhile(robust):
        payload = b"".join(line + b"\n" for line in DEEP_LINES)
        payload += b'{"id": 9, "language": "python3", "code": "print(9)"}\n'
        answers = ndjson_lines(robust, payload, len(DEEP_LINES) + 1)
        *refused, served = answers
        assert [a["error"]["code"] for a in refused] == ["bad_request"] * len(DEEP_LINES)  # type: ignore[index]
        assert served["stdout"] == "9\n"


def test_deeply_nested_http_bodies_get_400_and_the_daemon_serves(robust: Daemon) -> None:
    with served_meanwhile(robust):
        for body in DEEP_LINES:
            answer = native_http(robust, body)
            assert answer.status_code == 400
            assert answer.json()["error"]["code"] == "bad_request"
            dify = httpx.post(
                f"{robust.http_url}/v1/sandbox/run",
                content=b'{"language": "python3", "code": "1", "x": ' + DEEP + b"}",
                headers={"X-Api-Key": robust.api_key},
                timeout=HANG_GUARD,
            )
            assert (dify.status_code, dify.json()["code"]) == (400, -400)


BIG_BODY = 16 * 2**20  # [http] max_body_bytes, the most a client may announce


def unauthenticated_upload(daemon: Daemon, answers: list[bytes]) -> None:
    """Announce a 16 MiB body with a wrong key, read the answer, then push the body."""
    host, port = daemon.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HANG_GUARD) as sock:
        sock.sendall(
            b"POST /v1/sandbox/run HTTP/1.1\r\nHost: t\r\nX-Api-Key: wrong\r\n"
            b"Content-Length: %d\r\n\r\n" % BIG_BODY
        )
        answers.append(sock.recv(65536))  # the answer comes before any body byte is sent
        try:
            sock.sendall(b"x" * BIG_BODY)
        except OSError:
            pass  # the daemon closed: it never wanted the body


def test_unauthenticated_flood_of_big_bodies_is_refused_on_the_head(robust: Daemon) -> None:
    answers: list[bytes] = []
    with served_meanwhile(robust, route="http") as watch:
        for _round in range(3):
            at_once(24, unauthenticated_upload, robust, answers)
    print(f"unauthenticated flood (72 x 16 MiB): peak VmRSS {watch.peak_rss / 2**20:.1f} MiB")
    assert len(answers) == 72
    assert all(answer.startswith(b"HTTP/1.1 401 ") for answer in answers), answers[:3]
    assert watch.peak_rss <= RSS_BOUND


def authenticated_upload(daemon: Daemon, statuses: list[int]) -> None:
    body = json.dumps({"language": "python3", "code": "#" + "x" * (BIG_BODY - 100)})
    try:
        statuses.append(native_http(daemon, body.encode()).status_code)
    except httpx.HTTPError:
        statuses.append(0)  # closed while uploading: refused before the whole body was read


def test_authenticated_flood_of_big_bodies_stays_within_the_byte_budget(robust: Daemon) -> None:
    statuses: list[int] = []
    with served_meanwhile(robust) as watch:
        at_once(16, authenticated_upload, robust, statuses)
    print(f"authenticated flood (16 x 16 MiB): peak VmRSS {watch.peak_rss / 2**20:.1f} MiB")
    # 408: an upload slower than [http] header_timeout on this busy machine.
    assert set(statuses) <= {200, 408, 503, 0}, statuses
    assert 200 in statuses  # the budget holds some big bodies at once, and refuses the rest
    assert watch.peak_rss <= RSS_BOUND


def test_ndjson_client_that_never_reads_loses_its_connection(robust: Daemon) -> None:
    gave_up = "does not read"
    before = robust.log_path.read_text().count(gave_up)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(robust.socket_path)
    received = bytearray()
    with sock, served_meanwhile(robust) as watch:
        flood = "import sys; sys.stdout.write('x' * 1_000_000)"
        lines = [json.dumps({"id": n, "language": "python3", "code": flood}) for n in range(30)]
        sock.sendall("\n".join(lines).encode() + b"\n")
        # Never reading, until the daemon has given up on this client (its log says so).
        deadline = time.monotonic() + HANG_GUARD
        while robust.log_path.read_text().count(gave_up) == before:
            assert time.monotonic() < deadline, robust.log_path.read_text()
            time.sleep(0.05)
        sock.settimeout(HANG_GUARD)
        try:
            while chunk := sock.recv(2**20):
                received += chunk
        except ConnectionResetError:
            pass  # closed with answers unsent: a reset is the daemon's close too
    peak = watch.peak_rss / 2**20
    print(f"client that never reads (30 x 1 MB answers): peak VmRSS {peak:.1f} MiB")
    assert received.count(b"\n") < 30  # it stopped sending: the connection is gone
    assert watch.peak_rss <= RSS_BOUND


def slow_head(daemon: Daemon, outcomes: list[bytes]) -> None:
    """Send a request head one byte at a time, never finishing it, until closed."""
    host, port = daemon.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HANG_GUARD) as sock:
        sock.sendall(b"POST /v1/sandbox/run HTTP/1.1\r\nX-Slow: ")
        deadline = time.monotonic() + HANG_GUARD
        sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"a")
                outcomes.append(sock.recv(65536))
                return
            except TimeoutError:
                continue
            except OSError:
                outcomes.append(b"")
                return
        outcomes.append(b"still open")


def test_slow_loris_heads_are_cut_off_and_others_are_served(robust: Daemon) -> None:
    outcomes: list[bytes] = []
    with served_meanwhile(robust, route="http"):
        at_once(20, slow_head, robust, outcomes)
    assert len(outcomes) == 20
    # Each one was answered 408 and closed (or closed), none left open.
    assert all(o.startswith(b"HTTP/1.1 408 ") or o == b"" for o in outcomes), outcomes


def test_connections_past_the_cap_get_503_with_retry_after(robust: Daemon) -> None:
    host, port = robust.http_url.removeprefix("http://").split(":")
    with served_meanwhile(robust):  # the Unix socket is another listener: it is served
        held = [socket.create_connection((host, int(port))) for _ in range(CONNECTION_CAP + 5)]
        try:
            refusals = []
            for sock in held:
                sock.settimeout(0.5)
                try:
                    refusals.append(sock.recv(65536))
                except TimeoutError:
                    continue  # accepted and waiting for its request: held open
            refused = [r for r in refusals if r]
            assert refused, "no connection past the cap was refused"
            for refusal in refused:
                head, _, body = refusal.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503 ")
                assert b"retry-after: 1" in head.lower()
                assert json.loads(body)["code"] == -503
        finally:
            for sock in held:
                sock.close()


def test_native_run_with_network_in_reject_mode_is_400_in_the_native_envelope(
    robust: Daemon,
) -> None:
    with served_meanwhile(robust):
        body = {"id": "n", "language": "python3", "code": "1", "enable_network": True}
        answer = native_http(robust, body)
        assert answer.status_code == 400
        assert answer.json() == {
            "id": "n",
            "error": {
                "code": "bad_request",
                "message": "network is disabled, please enable it in the configuration",
            },
        }
