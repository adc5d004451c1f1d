"""Stopping: in-flight runs finish, requests that arrive meanwhile get an error, never silence."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from pathlib import Path

from tests.integration.conftest import start_daemon


def test_stop_finishes_in_flight_runs_and_answers_late_requests(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    slow: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: slow.update(daemon.run("import time; time.sleep(1); print('done')"))
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
        late.settimeout(30)
        late.connect(daemon.socket_path)  # accepted before the stop
        thread.start()
        # The slow run is admitted once its worker holds a slot; a fresh request on
        # another connection proves the daemon has read it (answers come in order).
        assert daemon.run("print(1)")["stdout"] == "1\n"
        daemon.process.send_signal(signal.SIGTERM)
        late.sendall(b'{"id": "late", "language": "python3", "code": "print(2)"}\n')
        answer = json.loads(late.makefile("rb").readline())
    thread.join()
    assert daemon.process.wait(timeout=30) == 0
    assert slow["status"] == "ok" and slow["stdout"] == "done\n", slow
    assert answer["id"] == "late"
    # Either it ran before the stop began, or it was refused with a retryable error.
    assert answer.get("stdout") == "2\n" or answer["error"]["code"] == "overloaded", answer


def test_a_stopping_daemon_turns_unhealthy_before_its_in_flight_runs_finish(
    tmp_path: Path,
) -> None:
    daemon = start_daemon(tmp_path)
    port = int(daemon.http_url.rsplit(":", 1)[1])
    balancer = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # one kept-alive
    balancer.request("GET", "/health")
    first = balancer.getresponse()
    assert (first.status, first.read()) == (200, b'"ok"')
    slow: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: slow.update(daemon.run("import time; time.sleep(3); print('done')"))
    )
    thread.start()
    assert daemon.run("print(1)")["stdout"] == "1\n"  # the slow run is admitted by now
    daemon.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:
        balancer.request("GET", "/health")
        answer = balancer.getresponse()
        body = answer.read()
        if answer.status != 200 or time.monotonic() > deadline:
            break
    in_flight_when_unhealthy = not slow
    balancer.close()
    thread.join()
    assert daemon.process.wait(timeout=30) == 0
    assert answer.status == 503, (answer.status, body)
    assert answer.getheader("Retry-After") == "1"
    assert json.loads(body) == {
        "code": -503,
        "message": "unavailable: the daemon is stopping",
        "data": None,
    }
    assert in_flight_when_unhealthy, "the daemon turned unhealthy only after its runs finished"
    assert slow["status"] == "ok" and slow["stdout"] == "done\n", slow
