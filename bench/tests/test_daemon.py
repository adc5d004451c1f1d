"""The private daemon gets the bench's socket and runtime dir, and a bad stop is reported."""

from __future__ import annotations

import os
import signal
import tomllib
from pathlib import Path

import trio

from bench.daemon import Daemon, daemon_command, exit_problem, rss_kib, write_config


def test_config_keeps_the_base_and_overrides_socket_and_runtime_dir(tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text(
        '[server]\nsocket = "/run/sandboxd/sandboxd.sock"\nstop_timeout = 5.0\n'
        "[python3]\npool_size = 3\n"
    )
    target = tmp_path / "bench.toml"
    write_config(base, "/tmp/b/s.sock", "/tmp/b/run", target)
    with target.open("rb") as file:
        config = tomllib.load(file)
    assert config["server"] == {
        "socket": "/tmp/b/s.sock",
        "stop_timeout": 5.0,
        "runtime_dir": "/tmp/b/run",
    }
    assert config["python3"] == {"pool_size": 3}


def test_daemon_command_disables_http() -> None:
    command = daemon_command(Path("/tmp/c.toml"), "/tmp/s.sock", None)
    assert command[-6:] == ["--config", "/tmp/c.toml", "--socket", "/tmp/s.sock", "--http", "none"]


async def _ended(argv: list[str], sig: signal.Signals | None) -> Daemon:
    process = await trio.lowlevel.open_process(argv)
    if sig is not None:
        process.send_signal(sig)
    await process.wait()
    return Daemon(socket="/nonexistent", process=process, log=None)


async def test_a_daemon_ended_by_sigterm_stopped_cleanly() -> None:
    daemon = await _ended(["/bin/sleep", "30"], signal.SIGTERM)
    assert exit_problem(daemon) is None


async def test_a_daemon_that_exits_non_zero_on_stop_is_reported() -> None:
    daemon = await _ended(["/bin/sh", "-c", "exit 3"], None)
    problem = exit_problem(daemon)
    assert problem is not None
    assert "status 3" in problem


def test_rss_of_this_process_is_read_from_proc() -> None:
    kib = rss_kib(os.getpid())
    assert kib is not None
    assert kib > 0
