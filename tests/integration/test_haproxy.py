"""Two daemons behind a real HAProxy running the shipped etc/haproxy/sandboxd.cfg.

A mixed load (Dify route and native route, python3 and nodejs) goes through the
balancer while one daemon is stopped and later started again on the same port.
Every request must be answered: with its own run's output, or with a 503 that
HAProxy did not retry (the run might have started); no connection error, no
other status. Runs cannot write host files (jailed), so "none ran twice" is
proven from what the daemons themselves record: each logs at stop how many runs
it answered, and the sum over both daemons and all their lifetimes must equal
the number of answers the clients got. A run done twice (a retry after it
started), or a run whose answer was lost, would make the sum larger.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.conftest import (
    API_KEY,
    Daemon,
    free_port,
    restart_daemon,
    start_daemon,
    stop_daemon,
)

HAPROXY = "/usr/sbin/haproxy"
SHIPPED = Path(__file__).parents[2] / "etc" / "haproxy" / "sandboxd.cfg"
CLIENTS = 4
# Answers before the stop, during the outage, and after the restart.
PHASE_ANSWERS = 40
HANG_GUARD = 90.0


def render(shipped: str, port: int, servers: dict[str, int]) -> str:
    """The shipped config with its bind address and server lines replaced."""
    lines: list[str] = []
    binds = servers_written = 0
    for line in shipped.splitlines():
        words = line.split()
        if words[:1] == ["bind"]:
            lines.append(f"    bind 127.0.0.1:{port}")
            binds += 1
        elif words[:1] == ["server"]:
            if not servers_written:
                lines += [f"    server {name} 127.0.0.1:{p}" for name, p in servers.items()]
            servers_written += 1
        else:
            lines.append(line)
    assert (binds, servers_written) == (1, 2), "the shipped config's shape changed"
    return "\n".join(lines) + "\n"


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Answers that carried the request's own run output, by route.
    answered: Counter[str] = field(default_factory=Counter)
    # 503s that reached the client (HAProxy gave up retrying).
    refused: int = 0
    # Anything else: connection errors, other statuses, wrong output.
    failures: list[str] = field(default_factory=list)

    @property
    def runs(self) -> int:
        with self.lock:
            return sum(self.answered.values())


def one_request(connection: http.client.HTTPConnection, kind: str, token: str) -> tuple[int, str]:
    headers = {"X-Api-Key": API_KEY, "Content-Type": "application/json"}
    if kind == "dify-python3":
        path, body = (
            "/v1/sandbox/run",
            {
                "language": "python3",
                "code": f"import time; time.sleep(0.05); print({token!r})",
            },
        )
    elif kind == "dify-nodejs":
        path, body = "/v1/sandbox/run", {"language": "nodejs", "code": f"console.log({token!r})"}
    else:
        path, body = "/v1/run", {"id": token, "language": "python3", "code": f"print({token!r})"}
    connection.request("POST", path, json.dumps(body), headers)
    response = connection.getresponse()
    return response.status, response.read().decode()


def client(port: int, number: int, stop: threading.Event, tally: Tally) -> None:
    kinds = itertools.cycle(["dify-python3", "dify-nodejs", "native-python3"])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD)
    for sequence in itertools.count():
        if stop.is_set():
            break
        kind, token = next(kinds), f"c{number}r{sequence}"
        try:
            status, text = one_request(connection, kind, token)
        except (OSError, http.client.HTTPException) as error:
            with tally.lock:
                tally.failures.append(f"{token} {kind}: {error!r}")
            connection.close()  # a fresh connection for the next request
            continue
        if status == 503:
            with tally.lock:
                tally.refused += 1
            continue
        answer = json.loads(text) if status == 200 else {}
        stdout = (
            answer.get("data", {}).get("stdout")
            if kind.startswith("dify")
            else answer.get("stdout")
        )
        with tally.lock:
            if stdout == f"{token}\n":
                tally.answered[kind] += 1
            else:
                tally.failures.append(f"{token} {kind}: HTTP {status} {text[:200]}")
    connection.close()


def wait_for(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def runs_counted_by(daemon: Daemon) -> float:
    port = int(daemon.http_url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD)
    try:
        connection.request("GET", "/metrics", headers={"X-Api-Key": API_KEY})
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return sum(float(v) for v in re.findall(r"^sandboxd_runs_total\{.*\} (\S+)$", text, re.M))


def answered_per_lifetime(daemon: Daemon) -> list[int]:
    """What the daemon logged at each stop: the runs it answered in that lifetime."""
    return [
        int(n) for n in re.findall(r"stopped: (\d+) runs answered", daemon.log_path.read_text())
    ]


def start_haproxy(config: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    if not os.access(HAPROXY, os.X_OK):
        pytest.fail(f"{HAPROXY} is missing: apt-get install haproxy (make apt does)")
    checked = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with log.open("wb") as out:
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + HANG_GUARD
    while True:
        assert process.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)


def test_two_daemons_behind_haproxy_answer_every_request_once_through_a_stop_and_restart(
    tmp_path: Path,
) -> None:
    first = start_daemon(tmp_path / "first")
    second = start_daemon(tmp_path / "second")
    # Warm-up (the data-science template's imports) is not what this test measures:
    # under load a daemon still warming up missed haproxy's 1 s health checks.
    for daemon in (first, second):
        daemon.wait_for_log("sandboxd ready:")
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    servers = {
        name: int(d.http_url.rsplit(":", 1)[1])
        for name, d in [("first", first), ("second", second)]
    }
    config.write_text(render(SHIPPED.read_text(), port, servers))
    balancer = start_haproxy(config, tmp_path / "haproxy.log", port)
    tally, stop = Tally(), threading.Event()
    clients = [threading.Thread(target=client, args=(port, n, stop, tally)) for n in range(CLIENTS)]
    began = time.monotonic()
    try:
        for thread in clients:
            thread.start()
        wait_for(lambda: tally.runs >= PHASE_ANSWERS, "answers before the stop")
        first.process.terminate()  # mid-load: its in-flight runs drain, the rest go elsewhere
        assert first.process.wait(timeout=HANG_GUARD) == 0
        during = tally.runs
        wait_for(lambda: tally.runs >= during + PHASE_ANSWERS, "answers with one daemon down")
        restart_daemon(first)
        wait_for(lambda: runs_counted_by(first) >= 1, "the restarted daemon to get runs again")
        after = tally.runs
        wait_for(lambda: tally.runs >= after + PHASE_ANSWERS, "answers after the restart")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=HANG_GUARD)
        elapsed = time.monotonic() - began
        balancer.terminate()
        balancer.wait(timeout=HANG_GUARD)
        for daemon in (first, second):
            if daemon.process.poll() is None:
                stop_daemon(daemon)
    assert tally.failures == [], tally.failures[:20]
    recorded = {"first": answered_per_lifetime(first), "second": answered_per_lifetime(second)}
    assert len(recorded["first"]) == 2 and len(recorded["second"]) == 1, recorded
    assert all(n > 0 for lifetimes in recorded.values() for n in lifetimes), recorded
    answers = sum(tally.answered.values())
    # None ran twice and none was lost: the daemons ran exactly what was answered.
    assert sum(sum(lifetimes) for lifetimes in recorded.values()) == answers, (recorded, tally)
    print(
        f"haproxy: {answers} runs answered ({dict(tally.answered)}), {tally.refused} 503 "
        f"not retried, 0 failed, in {elapsed:.1f} s with {CLIENTS} clients "
        f"({answers / elapsed:.0f} runs/s); runs per daemon lifetime: {recorded}"
    )
