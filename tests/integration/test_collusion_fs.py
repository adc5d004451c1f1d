"""Filesystem channels between concurrent runs, and answers bounded by the deadline.

DESIGN.md invariants 5, 15 and 18. Every test with two tenants sends both runs
at once through tenants.run_together, both written by the attacker; a run
prints MARKER only when the escape worked. A channel only one language can
express (node has no flock, fchdir or dnotify) is tested in the directions
where it can.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sandboxd.verdict import HELD_OPEN
from tests.integration.collusion_fs_cases import (
    GIVE_STDOUT,
    HOLD_LOCKS,
    PROBE_LOCKS,
    READ_WATCHED,
    SEND_ROOT_FD,
    SHARED_FILE,
    SHM_LOOK,
    SHM_WRITE,
    WALK_TO_HOST,
    WATCH,
    WRITE_INTO_OTHER,
)
from tests.integration.conftest import Daemon
from tests.integration.tenants import (
    DIRECTIONS,
    MARKER,
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


# Run on the host as root: enter a mount namespace (argv[1]: a process's
# /proc/PID/ns/mnt, or an nsfs fd under /proc/PID/fd; setns sets the root to that
# namespace's root, whatever the process chrooted to) and print the namespace's
# whole mount table, read through the host's /proc opened before.
# /proc/PID/mountinfo alone would not do: it hides mounts outside the process's
# root, so a chrooted worker's table looks clean while the host's root is there.
WHOLE_MOUNT_TABLE = """
import ctypes, os, sys
proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
namespace = os.open(sys.argv[1], os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(namespace, 0x00020000) != 0:  # CLONE_NEWNS
    sys.exit("setns: " + os.strerror(ctypes.get_errno()))
table = os.open("self/mountinfo", os.O_RDONLY, dir_fd=proc)
with os.fdopen(table, "rb") as whole:  # read() to the end: one read(2) gives a page
    sys.stdout.write(whole.read().decode())
"""


def mount_table(namespace: str) -> list[list[str]] | None:
    """The whole mount table of the mount namespace at path `namespace` (see
    WHOLE_MOUNT_TABLE); None if that path is gone (its process exited or closed it)."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", WHOLE_MOUNT_TABLE, namespace],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        assert not Path(namespace).exists(), done.stderr  # only a worker gone may fail
        return None
    return [line.split() for line in done.stdout.splitlines()]


def test_no_worker_has_the_host_root_in_its_mount_namespace(daemon: Daemon) -> None:
    """White box: from the host, read the mount namespace of every worker that is
    alive while a python3 and a nodejs run are (ready and running workers)."""
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
            if pid not in tables and (table := mount_table(f"/proc/{pid}/ns/mnt")) is not None:
                names[pid] = name
                tables[pid] = table
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


# --- locks, leases and watches on the shared read-only tree ---------------------------


@pytest.mark.parametrize(("sender", "receiver", "route"), PY_TO_PY, ids=PY_TO_PY_IDS)
def test_locks_on_shared_files_do_not_cross_runs(
    daemon: Daemon, sender: str, receiver: str, route: str
) -> None:
    holder, _ = run_together(
        daemon, Tenant(sender, HOLD_LOCKS), Tenant(receiver, PROBE_LOCKS), route
    )
    assert "holding []" in holder.stdout, holder.raw


@pytest.mark.parametrize(("sender", "receiver", "route"), TO_PY, ids=TO_PY_IDS)
def test_watches_on_shared_directories_do_not_see_other_runs(
    daemon: Daemon, sender: str, receiver: str, route: str
) -> None:
    _, watcher = run_together(
        daemon, Tenant(sender, READ_WATCHED[sender]), Tenant(receiver, WATCH), route
    )
    assert "dnotify refused" in watcher.stdout and "inotify refused" in watcher.stdout, watcher.raw


def test_refused_lock_and_watch_calls_are_clean_errors(daemon: Daemon) -> None:
    code = f"""
import ctypes, errno, fcntl, os
fd = os.open({SHARED_FILE}, os.O_RDONLY)
for name, call in (
    ("flock", lambda: fcntl.flock(fd, fcntl.LOCK_SH)),
    ("lockf", lambda: fcntl.lockf(fd, fcntl.LOCK_SH)),
    ("lease", lambda: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)),
    ("notify", lambda: fcntl.fcntl(fd, fcntl.F_NOTIFY, fcntl.DN_ACCESS)),
):
    try:
        call()
        print(name, "MARKER allowed")
    except OSError as error:
        print(name, errno.errorcode[error.errno])
libc = ctypes.CDLL(None, use_errno=True)
print("inotify", libc.inotify_init1(0), errno.errorcode[ctypes.get_errno()])
print("flags", fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
"""
    answer = daemon.run(code)
    assert answer["status"] == "ok", answer
    assert answer["stdout"].split("\n") == [
        "flock ENOSYS",
        "lockf ENOSYS",
        "lease ENOSYS",
        "notify ENOSYS",
        "inotify -1 ENOSYS",
        "flags 1",
        "",
    ], answer
    daemon.assert_healthy()


def test_sqlite_in_tmp_works_with_dot_file_locking_and_not_with_fcntl_locks(
    daemon: Daemon,
) -> None:
    """The trade-off the README states: fcntl locks are refused, so sqlite's default
    locking fails cleanly; its dot-file locking (files in /tmp) and :memory: work."""
    code = """
import sqlite3
try:
    db = sqlite3.connect("/tmp/default.db")
    db.execute("create table t (x)")
    print("default MARKER locked with fcntl")
except sqlite3.OperationalError as error:
    print("default", error)
for uri in ("file:/tmp/dot.db?vfs=unix-dotfile", ":memory:"):
    db = sqlite3.connect(uri, uri=True)
    db.execute("create table t (x)")
    db.executemany("insert into t values (?)", [(1,), (2,)])
    db.commit()
    print(uri, db.execute("select sum(x) from t").fetchone()[0])
"""
    answer = daemon.run(code)
    assert answer["status"] == "ok", answer
    lines = answer["stdout"].splitlines()
    assert lines[0].startswith("default ") and MARKER not in lines[0], answer
    assert lines[1:] == ["file:/tmp/dot.db?vfs=unix-dotfile 3", ":memory: 3"], answer


# --- /dev/shm ---------------------------------------------------------------------------


def test_multiprocessing_lock_works_and_dev_shm_is_the_runs_own_tmp(daemon: Daemon) -> None:
    code = """
import multiprocessing, os
lock = multiprocessing.Lock()
with lock:
    print("locked")
open("/dev/shm/mine", "w").write("x")
print(sorted(os.listdir("/tmp")))
chunk = b"x" * (1 << 20)
try:
    with open("/dev/shm/big", "wb") as big:
        for _ in range(128):  # twice the /tmp cap (64 MB), below the memory limit
            big.write(chunk)
            big.flush()
    print("MARKER /dev/shm outgrew the /tmp cap")
except OSError as error:
    print("capped", error.errno)
"""
    answer = daemon.run(code)
    assert answer["status"] == "ok", answer
    # /tmp/out (where a run leaves files it wants back) is in every run's /tmp.
    assert answer["stdout"].splitlines()[:2] == ["locked", "['mine', 'out']"], answer
    assert "capped 28" in answer["stdout"] and MARKER not in answer["stdout"], answer


@pytest.mark.parametrize(("sender", "receiver", "route"), PY_TO_PY, ids=PY_TO_PY_IDS)
def test_dev_shm_is_not_shared_between_runs(
    daemon: Daemon, sender: str, receiver: str, route: str
) -> None:
    run_together(daemon, Tenant(sender, SHM_WRITE), Tenant(receiver, SHM_LOOK), route)


# --- the answer is bounded by the deadline (invariant 18) -------------------------------


def test_a_run_that_gave_away_its_stdout_is_answered_by_its_deadline(daemon: Daemon) -> None:
    """Native route only: a Dify request cannot set its timeout, and MARKER's time is
    chosen from A's. Only python can pass fds (node has no SCM_RIGHTS)."""
    giver, taker = run_together(
        daemon,
        Tenant("python3", GIVE_STDOUT, timeout=2),
        Tenant("python3", WRITE_INTO_OTHER, timeout=12),
    )
    if "holding the other run's stdout" in taker.stdout:  # until runs share no socket
        assert giver.status == "timeout", giver.raw
        assert giver.raw["message"] == HELD_OPEN, giver.raw


# A grandchild in a new session keeps stdout after the run's pid 1 exits: the pid
# namespace dies with pid 1, so the run ends at once.
GRANDCHILD = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(4)
        print("MARKER from a grandchild", flush=True)
    os._exit(0)
os.wait()
print("parent done")
"""
# A thread writes after the deadline while the main thread has finished: the
# interpreter waits for it, so the run is killed at its deadline.
THREAD = """
import sys, threading, time
def late():
    time.sleep(4)
    sys.stdout.write("MARKER from a thread\\n")
    sys.stdout.flush()
threading.Thread(target=late).start()
print("main done", flush=True)
"""
# A daemon thread holds stdout when the interpreter exits: it dies with the process.
DAEMON_THREAD = """
import os, threading, time
def late():
    time.sleep(4)
    os.write(1, b"MARKER from a daemon thread\\n")
threading.Thread(target=late, daemon=True).start()
print("main done")
"""


@pytest.mark.parametrize(
    ("code", "status"),
    [(GRANDCHILD, "ok"), (THREAD, "timeout"), (DAEMON_THREAD, "ok")],
    ids=["grandchild", "thread", "daemon-thread"],
)
def test_nothing_of_a_run_writes_into_its_answer_after_the_deadline(
    daemon: Daemon, code: str, status: str
) -> None:
    answer = daemon.run(code.replace("MARKER", MARKER), timeout=2)
    assert MARKER not in answer["stdout"] and MARKER not in answer["stderr"], answer
    assert answer["status"] == status, answer
    daemon.assert_healthy()
