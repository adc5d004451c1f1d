"""sandboxd.systemd against real sockets: a datagram socket standing in for
systemd's notify socket, and real listening sockets passed as fds 3 and 4 to a
forked child, the way systemd hands them to sandboxd.service."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxd.systemd import Notifier, listen_fds


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket and the NOTIFY_SOCKET value naming it."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        yield sock, path


def received(sock: socket.socket) -> str:
    sock.settimeout(5)
    return sock.recv(4096).decode()


def test_ready_reaches_the_notify_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready()
    assert received(sock) == "READY=1"
    notifier.close()


def test_each_message_is_one_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    notifier.status("3 python3 ready, 10 runs")
    notifier.watchdog()
    notifier.stopping()
    assert [received(sock) for _ in range(3)] == [
        "STATUS=3 python3 ready, 10 runs",
        "WATCHDOG=1",
        "STOPPING=1",
    ]
    notifier.close()


def test_abstract_notify_socket_is_reached(notify_socket: tuple[socket.socket, str]) -> None:
    name = f"sandboxd-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        assert received(sock) == "READY=1"
        notifier.close()


def test_reloading_carries_the_monotonic_time_of_the_reload(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = received(sock).split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    notifier.close()


def test_status_cannot_inject_another_assignment(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    notifier.status("fine\nREADY=1")
    assert received(sock) == "STATUS=fine READY=1"
    notifier.close()


def test_without_notify_socket_every_method_is_a_no_op() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    notifier.ready()
    notifier.reloading()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    assert notifier.watchdog_interval() is None


def test_send_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, logger="sandboxd.systemd"):
        notifier.ready()
    assert "READY=1" in caplog.text
    notifier.close()


def test_a_full_notify_socket_does_not_block_the_daemon(
    notify_socket: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, path = notify_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    # Nobody reads: the receive queue fills (net.unix.max_dgram_qlen, 512 by
    # default) and a blocking send would hang here forever.
    with caplog.at_level(logging.WARNING, logger="sandboxd.systemd"):
        for _ in range(100_000):
            notifier.watchdog()
            if caplog.records:
                break
    assert "WATCHDOG=1" in caplog.text
    notifier.close()


def test_non_unix_notify_socket_disables_notification(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sandboxd.systemd"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "vsock:2:1234" in caplog.text


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_for_this_process_only(
    notify_socket: tuple[socket.socket, str], environ: dict[str, str], expected: float | None
) -> None:
    _, path = notify_socket
    assert Notifier.from_environ({"NOTIFY_SOCKET": path, **environ}).watchdog_interval() == expected


# --- socket activation --------------------------------------------------------------------------


def in_child(fn: Callable[[], Any]) -> Any:
    """Run fn in a forked child (where fds 3 and up are ours to clobber); return its result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            try:
                result: Any = {"ok": fn()}
            except BaseException:
                result = {"error": traceback.format_exc()}
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result["error"]
    return result["ok"]


def pass_as_systemd_does(sockets: list[socket.socket], names: str | None) -> dict[str, str]:
    """In the child: put the sockets on fds 3, 4, ... and build systemd's environment."""
    for fd, sock in enumerate(sockets, start=3):
        os.dup2(sock.fileno(), fd, inheritable=True)
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(sockets)), "PATH": "/bin"}
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    return environ


def describe(fd: int) -> dict[str, Any]:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return {
            "family": sock.family.name,
            "address": sock.getsockname(),
            "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        }


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[list[socket.socket]]:
    """A listening Unix socket and a listening loopback TCP socket, as in sandboxd.socket."""
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "sandboxd.sock"))
    unix.listen()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    yield [unix, tcp]
    unix.close()
    tcp.close()


def test_passed_sockets_are_found_by_name(listeners: list[socket.socket]) -> None:
    unix, tcp = listeners

    def child() -> Any:
        environ = pass_as_systemd_does(listeners, "ndjson:http")
        found = listen_fds(environ)
        return {
            "found": found,
            "sockets": {name: describe(fds[0]) for name, fds in found.items()},
            "environ": environ,
        }

    result = in_child(child)
    assert result["found"] == {"ndjson": [3], "http": [4]}
    assert result["sockets"]["ndjson"]["family"] == "AF_UNIX"
    assert result["sockets"]["ndjson"]["address"] == unix.getsockname()
    assert result["sockets"]["http"]["family"] == "AF_INET"
    assert tuple(result["sockets"]["http"]["address"]) == tcp.getsockname()
    assert all(info["cloexec"] for info in result["sockets"].values())
    assert result["environ"] == {"PATH": "/bin"}


def test_sockets_without_names_are_unknown(listeners: list[socket.socket]) -> None:
    result = in_child(lambda: listen_fds(pass_as_systemd_does(listeners, None)))
    assert result == {"unknown": [3, 4]}


def test_sockets_sharing_a_name_are_listed_together(listeners: list[socket.socket]) -> None:
    result = in_child(lambda: listen_fds(pass_as_systemd_does(listeners, "ndjson:ndjson")))
    assert result == {"ndjson": [3, 4]}


def test_sockets_for_another_pid_are_not_taken(listeners: list[socket.socket]) -> None:
    def child() -> Any:
        environ = pass_as_systemd_does(listeners, "ndjson:http")
        environ["LISTEN_PID"] = str(os.getppid())
        return {"found": listen_fds(environ), "environ": environ, "fd3": describe(3)}

    result = in_child(child)
    assert result["found"] == {}
    assert result["environ"] == {"PATH": "/bin"}
    assert not result["fd3"]["cloexec"]


def test_explicit_pid_is_compared_with_listen_pid() -> None:
    environ = {"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ndjson:http"}
    assert listen_fds(environ, pid=4243) == {}
    assert environ == {}


def test_not_socket_activated_leaves_other_variables_alone() -> None:
    environ = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/systemd/notify"}
    assert listen_fds(environ) == {}
    assert environ == {"PATH": "/bin", "NOTIFY_SOCKET": "/run/systemd/notify"}


def test_names_that_do_not_match_the_count_are_refused(listeners: list[socket.socket]) -> None:
    def child() -> str:
        try:
            listen_fds(pass_as_systemd_does(listeners, "ndjson"))
        except ValueError as error:
            return str(error)
        return "accepted"

    assert in_child(child) == "LISTEN_FDNAMES names 1 sockets, LISTEN_FDS=2"
