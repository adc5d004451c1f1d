"""Two tenants at once: the collusion threat model of DESIGN.md invariant 15.

The attacker writes both runs. `run_together` sends them at the same time (each
on its own connection, over the native socket or the Dify route), and proves
they really overlapped: each run prints the host-wide CLOCK_MONOTONIC when it
starts and when it exits, and the two intervals must intersect. It then asserts
that MARKER (printed only when an escape worked) is in neither answer and that
the daemon still serves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import httpx

from tests.integration.conftest import Daemon

MARKER = "ESCAPED-7f3a"
_START = "SANDBOXD-TENANT-START"
_END = "SANDBOXD-TENANT-END"

# (sender language, receiver language, route): every direction the isolation tests cover.
DIRECTIONS = [
    ("python3", "python3", "native"),
    ("nodejs", "python3", "native"),
    ("python3", "nodejs", "native"),
    ("python3", "python3", "dify"),
    ("nodejs", "python3", "dify"),
    ("python3", "nodejs", "dify"),
]
DIRECTION_IDS = [f"{a}-to-{b}-{route}" for a, b, route in DIRECTIONS]

# Stamps around the code: the start before it, the end when the process exits
# (atexit / process 'exit' run even after an uncaught exception).
_STAMPS = {
    "python3": (
        "import atexit as _a, time as _t\n"
        f"print('{_START}', _t.monotonic(), flush=True)\n"
        f"_a.register(lambda: print('{_END}', _t.monotonic(), flush=True))\n"
    ),
    "nodejs": (
        "const _hr = () => Number(process.hrtime.bigint()) / 1e9;\n"
        f"console.log('{_START}', _hr());\n"
        f"process.on('exit', () => console.log('{_END}', _hr()));\n"
    ),
}


@dataclass(frozen=True)
class Tenant:
    language: str
    # May contain the word MARKER, replaced by the marker before sending.
    code: str
    timeout: float = 10.0


@dataclass
class Answer:
    """One run's answer, the same shape whichever route carried it."""

    route: str
    raw: dict[str, Any]
    stdout: str
    stderr: str
    # ok/error/timeout/... on the native route; "ok" or the Dify error text otherwise.
    status: str

    def interval(self) -> tuple[float, float] | None:
        start = end = None
        for line in self.stdout.splitlines():
            word, _, value = line.partition(" ")
            if word == _START:
                start = float(value)
            elif word == _END:
                end = float(value)
        return (start, end) if start is not None and end is not None else None


def _send(daemon: Daemon, tenant: Tenant, route: str) -> Answer:
    code = _STAMPS[tenant.language] + tenant.code.replace("MARKER", MARKER)
    if route == "native":
        raw = daemon.run(code, tenant.language, timeout=tenant.timeout)
        stdout, stderr = raw.get("stdout", ""), raw.get("stderr", "")
        return Answer(route, raw, stdout, stderr, raw.get("status") or str(raw.get("error")))
    response = httpx.post(
        f"{daemon.http_url}/v1/sandbox/run",
        headers={"X-Api-Key": daemon.api_key},
        json={"language": tenant.language, "code": code, "enable_network": True},
        timeout=tenant.timeout + 30,
    )
    raw = response.json()
    data = raw.get("data") or {}
    status = "ok" if raw.get("code") == 0 and not data.get("error") else str(data or raw)
    return Answer(route, raw, data.get("stdout", ""), data.get("stderr", ""), status)


def run_together(daemon: Daemon, a: Tenant, b: Tenant, route: str = "native") -> list[Answer]:
    """Send both runs at once; assert they overlapped, neither escaped, the daemon serves."""
    answers: list[Answer | BaseException | None] = [None, None]

    def send(index: int, tenant: Tenant) -> None:
        try:
            answers[index] = _send(daemon, tenant, route)
        except BaseException as error:  # re-raised in the test's thread below
            answers[index] = error

    threads = [threading.Thread(target=send, args=(i, t)) for i, t in enumerate((a, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done: list[Answer] = []
    for answer in answers:
        if not isinstance(answer, Answer):
            raise AssertionError(f"a tenant's request failed: {answer!r}")
        done.append(answer)
    for answer in done:
        assert MARKER not in answer.stdout, answer.raw
        assert MARKER not in answer.stderr, answer.raw
    first, second = (answer.interval() for answer in done)
    assert first is not None and second is not None, f"a run did not start or end: {done}"
    assert first[0] < second[1] and second[0] < first[1], f"the runs did not overlap: {done}"
    daemon.assert_healthy()
    return done
