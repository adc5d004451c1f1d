"""Filesystem channels between concurrent runs, and answers bounded by the deadline.

DESIGN.md invariants 5, 15 and 18. Every test with two tenants sends both runs
at once through tenants.run_together, both written by the attacker; a run
prints MARKER only when the escape worked. A channel only one language can
express (node has no flock, fchdir or dnotify) is tested in the directions
where it can.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon
from tests.integration.tenants import (
    DIRECTIONS,
    Tenant,
    run_together,
)

# The routes on which a python3 run can meet another python3 run.
PY_TO_PY = [(a, b, route) for a, b, route in DIRECTIONS if a == b == "python3"]
PY_TO_PY_IDS = [f"{a}-to-{b}-{route}" for a, b, route in PY_TO_PY]
# The directions whose receiver is python3 (node's sender side is reading files).
TO_PY = [(a, b, route) for a, b, route in DIRECTIONS if b == "python3"]
TO_PY_IDS = [f"{a}-to-{b}-{route}" for a, b, route in TO_PY]

# --- no host root in a worker's mount namespace ---------------------------------------


def send_fds(name: str, fds: str, seconds: float, then: str = "c.recv(1)") -> str:
    """Python code: serve `fds` (an expression) over abstract socket `name` once, then
    run `then` (by default: wait for the taker's word that it is done with them)."""
    return f"""
import os, socket
s = socket.socket(socket.AF_UNIX); s.bind("\\0{name}"); s.listen(1)
s.settimeout({seconds})
try:
    c, _ = s.accept()
    socket.send_fds(c, [b"x"], {fds})
    print("gave", {fds!r})
    {then}
except OSError as error:
    print("no taker:", error)
"""


def receive_fds(name: str) -> str:
    """Python code: `fds`, the fds received over abstract socket `name` (or none)."""
    return f"""
import os, socket, time
fds = []
for _ in range(50):
    try:
        s = socket.socket(socket.AF_UNIX); s.connect("\\0{name}")
        _, fds, _, _ = socket.recv_fds(s, 10, 4)
        break
    except OSError:
        time.sleep(0.1)
"""


# The reproduction: A sends an fd of its "/" over an abstract socket, B walks
# `..` from it. With pivot_root the walk stays in A's jail root.
SEND_ROOT_FD = send_fds("sandboxd-isofs-root", 'os.open("/", os.O_RDONLY)', 5)
WALK_TO_HOST = (
    receive_fds("sandboxd-isofs-root")
    + """
if fds:
    os.fchdir(fds[0])
    for _ in range(30):
        os.chdir("..")
    names = set(os.listdir("."))
    print("walked to", sorted(names))
    if names & {"home", "root", "var", "boot", "proc", "run", "srv", "mnt"}:
        print("MARKER host root listed")
    for path in ("etc/sandboxd/sandboxd.toml", "etc/shadow", "etc/os-release"):
        if os.path.exists(path):
            print("MARKER host file", path)
    try:
        open("tmp/sandboxd-isofs-probe", "w").write("x")
        print("MARKER wrote to", os.path.realpath("tmp"))
    except OSError:
        pass
    s.send(b"x")
"""
)


@pytest.mark.parametrize(("sender", "receiver", "route"), PY_TO_PY, ids=PY_TO_PY_IDS)
def test_a_root_fd_from_another_run_does_not_lead_to_the_host(
    daemon: Daemon, sender: str, receiver: str, route: str
) -> None:
    run_together(daemon, Tenant(sender, SEND_ROOT_FD), Tenant(receiver, WALK_TO_HOST), route)


def _host_root() -> tuple[str, str]:
    """(major:minor, root) of the filesystem mounted at the host's "/"."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return fields[2], fields[3]
    raise AssertionError("the host has no / in its mountinfo")


def _workers_of(daemon: Daemon) -> dict[int, str]:
    """pid -> comm of every live process whose uid is in the daemon's range."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        uid = int(fields["Uid"].split()[0])
        if daemon.uid_min <= uid <= daemon.uid_max:
            found[int(entry)] = fields["Name"].strip()
    return found


def test_no_worker_has_the_host_root_in_its_mount_namespace(daemon: Daemon) -> None:
    """White box: read each live worker's mount table from the host while runs are live."""
    sleepers = [
        threading.Thread(target=daemon.run, args=("import time; time.sleep(4)", "python3")),
        threading.Thread(target=daemon.run, args=("setTimeout(() => {}, 4000)", "nodejs")),
    ]
    for thread in sleepers:
        thread.start()
    device, root = _host_root()
    tables: dict[int, list[list[str]]] = {}
    names: dict[int, str] = {}
    while any(thread.is_alive() for thread in sleepers):  # every worker seen meanwhile
        for pid, name in _workers_of(daemon).items():
            try:
                text = Path(f"/proc/{pid}/mountinfo").read_text()
            except OSError:
                continue  # exited meanwhile
            names[pid] = name
            tables[pid] = [line.split() for line in text.splitlines()]
    for thread in sleepers:
        thread.join()
    assert {names[pid] for pid in tables} >= {"node"}, names
    assert len(tables) >= 2, names
    for pid, table in tables.items():
        whole_host = [m for m in table if m[2] == device and m[3] == root]
        assert whole_host == [], (pid, names[pid], whole_host)
        at_root = [m for m in table if m[4] == "/"]
        assert len(at_root) == 1 and "sandboxd-root" in at_root[0], (pid, at_root)
    daemon.assert_healthy()
