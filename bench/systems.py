"""What the bench measures: sandboxd over its socket, and spawn-per-run baselines.

Each system turns a workload and a client count into one run function per
client. A run is ok only if it exited 0 with exactly the expected stdout;
anything else is an error with a description the report prints.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio

from bench.client import Answer, Connection, ConnectionLost, RequestTemplate
from bench.load import ClientStopped, Outcome, RunOnce
from bench.workloads import Workload
from sandboxd.protocol import Language

SANDBOXD = "sandboxd"

# Baselines get a fixed, minimal environment: the host's (e.g. NODE_EXTRA_CA_CERTS)
# would change what they do and cost.
BASELINE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

# bubblewrap as a typical spawn-per-run jail: read-only /usr, private /proc, /dev
# and /tmp, every namespace unshared (no network), killed with its parent.
BWRAP = (
    "/usr/bin/bwrap",
    "--ro-bind", "/usr", "/usr",
    "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64",
    "--symlink", "usr/bin", "/bin",
    "--symlink", "usr/sbin", "/sbin",
    "--proc", "/proc",
    "--dev", "/dev",
    "--tmpfs", "/tmp",
    "--unshare-all",
    "--die-with-parent",
)  # fmt: skip


@dataclass(frozen=True)
class Baseline:
    name: str
    language: Language
    argv: tuple[str, ...]  # the code is appended as the last argument

    def command(self, code: str) -> list[str]:
        return [*self.argv, code]


BASELINES = (
    Baseline("python3 -c", "python3", ("/usr/bin/python3", "-c")),
    Baseline("bwrap python3", "python3", (*BWRAP, "/usr/bin/python3", "-c")),
    Baseline("node -e", "nodejs", ("/usr/bin/node", "-e")),
)


def _tail(text: str, limit: int = 160) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def judge_answer(answer: Answer, expected: str) -> str:
    """'' when the answer is a correct run, else what went wrong."""
    if answer.error is not None:
        return f"error reply {answer.error.code}: {answer.error.message}"
    if answer.status != "ok":
        return (
            f"status {answer.status} (exit {answer.exit_code}, signal {answer.signal}): "
            f"{_tail(answer.stderr)!r}"
        )
    if answer.stdout != expected:
        return f"wrong stdout: {_tail(answer.stdout, 80)!r}"
    return ""


def judge_process(returncode: int, stdout: bytes, stderr: bytes, expected: str) -> str:
    if returncode != 0:
        return f"exit {returncode}: {_tail(stderr.decode(errors='replace'))!r}"
    text = stdout.decode(errors="replace")
    if text != expected:
        return f"wrong stdout: {_tail(text, 80)!r}"
    return ""


def sandboxd_run(connection: Connection, template: RequestTemplate, expected: str) -> RunOnce:
    async def run_once() -> Outcome:
        try:
            answer, seconds = await connection.request(template)
        except ConnectionLost as exc:
            raise ClientStopped(f"connection lost: {exc}") from exc
        return Outcome(judge_answer(answer, expected), seconds, answer.wall_ms, answer.cpu_ms)

    return run_once


@asynccontextmanager
async def sandboxd_clients(
    socket_path: str, workload: Workload, clients: int, connections: int = 0
) -> AsyncIterator[list[RunOnce]]:
    """`clients` run functions over `connections` connections (0: one each), round robin.

    Clients sharing a connection have requests in flight on it at once.
    """
    template = RequestTemplate(workload.language, workload.code)
    count = clients if connections <= 0 else min(connections, clients)
    async with AsyncExitStack() as stack:
        opened = [
            await stack.enter_async_context(await Connection.open(socket_path))
            for _ in range(count)
        ]
        yield [sandboxd_run(opened[i % count], template, workload.expected) for i in range(clients)]


async def probe(socket_path: str, workload: Workload) -> Answer:
    """One request on a fresh connection (warm-up, availability check)."""
    template = RequestTemplate(workload.language, workload.code)
    async with await Connection.open(socket_path) as connection:
        answer, _ = await connection.request(template)
    return answer


def baseline_run(
    baseline: Baseline, workload: Workload, env: dict[str, str] = BASELINE_ENV
) -> RunOnce:
    argv = baseline.command(workload.baseline_code or workload.code)

    async def run_once() -> Outcome:
        start = time.perf_counter()
        done = await trio.run_process(
            argv,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
        seconds = time.perf_counter() - start
        problem = judge_process(done.returncode, done.stdout, done.stderr, workload.expected)
        return Outcome(problem, seconds)

    return run_once
