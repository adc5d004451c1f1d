"""Starting a private sandboxd for the bench, waiting until it answers, stopping it.

The daemon gets a temporary socket and runtime dir (its runtime dir is wiped at
start, so it must never be the host's /run/sandboxd) and no HTTP listener. Its
stderr goes to a log file whose tail is shown when it fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.client import Connection, ConnectionLost, RequestTemplate
from bench.workloads import READY

READY_PROBE = RequestTemplate(READY.language, READY.code)
# The checkout holding the bench package, so `python -m bench.echo` resolves anywhere.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_POLL_SECONDS = 0.1


class DaemonFailed(Exception):
    """The daemon did not start, or died; the message carries its log's tail."""


@dataclass(frozen=True)
class Daemon:
    socket: str
    process: trio.Process | None  # None when the bench uses a running daemon
    log: Path | None


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise DaemonFailed(f"cannot carry config value {value!r} into the bench's config")


BENCH_UID_MIN = 3_900_000
BENCH_UID_COUNT = 1000


def write_config(base: Path | None, socket: str, runtime_dir: str, target: Path) -> None:
    """The base config (tables of scalars) with the bench's socket and runtime dir."""
    tables: dict[str, dict[str, object]] = {}
    if base is not None:
        with base.open("rb") as file:
            tables = {name: dict(values) for name, values in tomllib.load(file).items()}
    tables.setdefault("server", {}).update(socket=socket, runtime_dir=runtime_dir)
    # A uid range of its own: a daemon refuses to start on a range another daemon holds,
    # and the packaged default (61000..61999) belongs to the host's installed sandboxd.
    tables.setdefault("jail", {}).setdefault("uid_min", BENCH_UID_MIN)
    tables["jail"].setdefault("uid_max", BENCH_UID_MIN + BENCH_UID_COUNT - 1)
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    target.write_text("\n".join(lines))


def log_tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return "(no log)"
    text = log.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


async def _answers(socket: str) -> bool:
    try:
        async with await Connection.open(socket) as connection:
            await connection.request(READY_PROBE)
    except (OSError, ConnectionLost):
        return False
    return True


async def wait_ready(daemon: Daemon, timeout: float) -> None:
    """Polls until the daemon answers one request (any answer), bounded by `timeout`."""
    deadline = trio.current_time() + timeout
    for _ in range(int(timeout / _POLL_SECONDS) + 1):
        if daemon.process is not None and daemon.process.returncode is not None:
            raise DaemonFailed(
                f"the daemon exited with {daemon.process.returncode} before answering:\n"
                + log_tail(daemon.log)
            )
        with trio.move_on_at(deadline):
            if await _answers(daemon.socket):
                return
        if trio.current_time() >= deadline:
            break
        await trio.sleep(_POLL_SECONDS)
    raise DaemonFailed(
        f"no answer on {daemon.socket} within {timeout:g} s:\n" + log_tail(daemon.log)
    )


def daemon_command(config: Path, socket: str, state_dir: str | None) -> list[str]:
    command = [sys.executable, "-m", "sandboxd", "serve", "--config", str(config)]
    command += ["--socket", socket, "--http", "none"]
    if state_dir is not None:
        command += ["--state-dir", state_dir]
    return command


def echo_command(socket: str, answers: Path) -> list[str]:
    return [sys.executable, "-m", "bench.echo", "--socket", socket, "--answers", str(answers)]


@asynccontextmanager
async def started(
    command: list[str], socket: str, log: Path, start_timeout: float, stop_timeout: float
) -> AsyncIterator[Daemon]:
    """Runs `command` as the daemon for the duration of the block, then stops it."""
    with log.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=_PROJECT_ROOT
        )
    daemon = Daemon(socket=socket, process=process, log=log)
    try:
        await wait_ready(daemon, start_timeout)
        yield daemon
    finally:
        with trio.CancelScope(shield=True):
            await stop(process, stop_timeout)


async def stop(process: trio.Process, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


def exit_problem(daemon: Daemon) -> str | None:
    """None when the daemon the bench started stopped cleanly on SIGTERM, else what happened."""
    if daemon.process is None:
        return None
    code = daemon.process.returncode
    if code in (0, -signal.SIGTERM):
        return None
    if code == -signal.SIGKILL:
        what = "it did not stop on SIGTERM and was killed"
    else:
        what = f"it exited with status {code} after SIGTERM"
    return f"{what}; log tail:\n{log_tail(daemon.log)}"


def rss_kib(pid: int) -> int | None:
    """VmRSS of that one process, in KiB (None if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


async def daemon_pid(socket: str) -> int:
    """The pid of the process listening on `socket` (the daemon itself, not a wrapper)."""
    async with await Connection.open(socket) as connection:
        return connection.peer_pid()


def running_daemon(socket: str) -> Daemon:
    if not os.path.exists(socket):
        raise DaemonFailed(f"no socket at {socket} (is the daemon running?)")
    return Daemon(socket=socket, process=None, log=None)
