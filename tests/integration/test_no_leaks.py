"""After 10,000 runs only the live pool remains: no cgroup, process, uid or fd leaks."""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.integration.conftest import Daemon, start_daemon, stop_daemon

RUNS = 10_000
CLIENTS = 4
# No data-science pool (Debian's numpy on the host would start one): only plain runs here.
POOL = '[python3]\npool_size = 2\nwarm_modules = ""\n[nodejs]\npool_size = 1\n'


def _runs(daemon: Daemon, count: int) -> int:
    """Send `count` hello runs on one connection, a few in flight; how many were ok."""
    ok = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(daemon.socket_path)
        answers = sock.makefile("rb")
        request = b'{"language": "python3", "code": "print(1)"}\n'
        for _ in range(count):
            sock.sendall(request)
            ok += json.loads(answers.readline())["stdout"] == "1\n"
    return ok


def _cgroups_of(pid: int) -> set[str]:
    """Names of the per-worker cgroups the daemon has, over every v1 hierarchy."""
    found = set()
    for controller in ("memory", "pids", "cpu"):
        top = f"/sys/fs/cgroup/{controller}/sandboxd.{pid}"
        for _, dirs, _ in os.walk(top):
            found.update(d for d in dirs if d.startswith("w"))
    return found


def _fds(pid: int) -> list[str]:
    """What the daemon's open fds point at, sockets and pipes by kind only."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        targets.append(target.split("[")[0] + ("[...]" if "[" in target else ""))
    return targets


def _status(pid: int | str) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as status:
            return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
    except OSError:
        return {}


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` is above `pid` (worker -> daemon: CLONE_PARENT)."""
    for _ in range(8):
        parent = int(_status(pid).get("PPid", "0"))
        if parent == ancestor:
            return True
        if parent <= 1:
            return False
        pid = parent
    return False


def _pool_uid_processes(daemon_pid: int, first: int, last: int) -> list[int]:
    """Processes of this daemon (other test daemons may be alive) running as a pool uid."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            uid = _status(entry).get("Uid", "").split()
            if uid and first <= int(uid[0]) <= last and _descends_from(int(entry), daemon_pid):
                found.append(int(entry))
    return found


LIVE = 2 + 1  # the python3 and nodejs pool sizes: one process and one cgroup each


def _settled(daemon: Daemon) -> tuple[set[str], list[int]]:
    """Per-worker cgroups and pool-uid processes once only the ready pool is left.

    Workers are retired (and replaced) just after their answers: poll, bounded."""
    deadline = time.monotonic() + 20
    while True:
        cgroups = _cgroups_of(daemon.process.pid)
        workers = _pool_uid_processes(daemon.process.pid, daemon.uid_min, daemon.uid_max)
        if (len(cgroups), len(workers)) == (LIVE, LIVE) or time.monotonic() > deadline:
            return cgroups, workers
        time.sleep(0.1)


def test_ten_thousand_runs_leave_only_the_live_pool(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, POOL)
    try:
        daemon.assert_healthy()  # the socket accepts before the pools are warm; this waits
        _settled(daemon)
        fds_before = _fds(daemon.process.pid)
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            ok = sum(pool.map(lambda _: _runs(daemon, RUNS // CLIENTS), range(CLIENTS)))
        assert ok == RUNS
        daemon.assert_healthy()
        cgroups, workers = _settled(daemon)
        assert len(cgroups) == LIVE, cgroups
        assert len(workers) == LIVE, workers
        fds_after = _fds(daemon.process.pid)
        assert sorted(fds_after) == sorted(fds_before)
    finally:
        stop_daemon(daemon)


def _inheritable(pid: int) -> list[str]:
    """The daemon's fds beyond stdio without close-on-exec, with what they point at."""
    found = []
    for fd in sorted(map(int, os.listdir(f"/proc/{pid}/fd"))):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags"))
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if fd > 2 and not flags & os.O_CLOEXEC:
            found.append(f"{fd} -> {target}")
    return found


def test_the_daemon_holds_no_inheritable_fd_of_its_workers(tmp_path: Path) -> None:
    # Every pool (python3, data science, node), so the fds of workers cloned by the zygote
    # and by a template all came in over the control socket; a subprocess the daemon
    # starts (pip, npm, a new zygote) must never inherit another run's pipes or pidfds.
    daemon = start_daemon(tmp_path)
    try:
        daemon.assert_healthy()
        assert _runs(daemon, 3) == 3
        _settled(daemon)
        assert _inheritable(daemon.process.pid) == []
    finally:
        stop_daemon(daemon)
