"""Red team: workers cloned as the daemon's children (DESIGN.md invariants 4, 10, 15).

The zygote and the data-science template clone each worker with CLONE_PARENT, as
pid 1 of its own pid namespace and a child of the daemon, which waits on its pidfd.
The attacker writes both runs of each pair (tenants.run_together) and knows the
host pids of the daemon, the zygote, the template and the ready workers (guessed
from outside: the test reads them on the host and writes them into the code). It
tries to signal, pidfd_open, ptrace or see them through /proc, kills everything
kill(-1) reaches, and leaves the runs in odd states (a fork bomb that exits at
once, a daemonized grandchild, two exits racing, a pid 1 that ignores SIGTERM past
its deadline). MARKER is printed only when an attack worked; afterwards the host
checks that those processes are the same and alive, that every process holding a
uid of the pool is a ready worker (no zombie, no survivor of a run), and that the
daemon serves.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.integration.conftest import Daemon
from tests.integration.tenants import Tenant, run_together
from tests.integration.test_redteam_science import (  # a fixture, and the host's view
    _children,
    debian,  # noqa: F401
)


def _status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict ({} once the process is gone)."""
    try:
        text = Path("/proc", str(pid), "status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _targets(daemon: Daemon) -> list[int]:
    """The daemon, its children (zygote, template, ready workers) and theirs."""
    found = [daemon.process.pid]
    for pid in _children(daemon.process.pid):
        found += [pid, *_children(pid)]
    return sorted(set(found))


_PYTHON_REACH = """
import ctypes, os, signal, time
pids = {pids!r}
print('PARENT', os.getppid())
for pid in pids:
    if pid == os.getpid():
        continue
    try:
        os.kill(pid, 0)
        print('MARKER signal reaches', pid)
    except OSError:
        pass
    if os.path.exists(f'/proc/{{pid}}'):
        print('MARKER /proc shows', pid)
# pidfd_open and ptrace (PTRACE_ATTACH = 16) from a child: seccomp may kill it
# (blocked_syscall), and the run goes on.
libc = ctypes.CDLL(None, use_errno=True)
for pid in pids:
    child = os.fork()
    if child == 0:
        try:
            os.close(os.pidfd_open(pid))
            print('MARKER pidfd of', pid, flush=True)
        except OSError:
            pass
        if libc.ptrace(16, pid, 0, 0) == 0:
            print('MARKER ptrace attached', pid, flush=True)
        os._exit(0)
    os.waitpid(child, 0)
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.kill(-1, sig)
    except OSError:
        pass
time.sleep(0.6)
print('REACHED', len(pids))
"""

_NODE_REACH = """
const pids = {pids_js};
for (const pid of pids) {{
  if (pid === process.pid) continue;
  try {{ process.kill(pid, 0); console.log('MARKER signal reaches', pid); }} catch (e) {{}}
}}
for (const sig of ['SIGTERM', 'SIGKILL']) {{ try {{ process.kill(-1, sig); }} catch (e) {{}} }}
setTimeout(() => console.log('REACHED', pids.length), 600);
"""


def test_a_worker_reaches_no_host_process_by_pid(debian: Daemon) -> None:  # noqa: F811
    assert debian.run("import numpy\nprint(1)")["status"] == "ok"  # the template is up
    pids = _targets(debian)
    names = {pid: _status(pid).get("Name") for pid in pids}
    python = _PYTHON_REACH.format(pids=pids)
    science = "import numpy\n" + python
    node = _NODE_REACH.format(pids_js=str(pids))
    for first, second in (
        (Tenant("python3", python), Tenant("python3", science)),
        (Tenant("nodejs", node), Tenant("python3", python)),
    ):
        for answer in run_together(debian, first, second):
            assert f"REACHED {len(pids)}" in answer.stdout, answer.raw
            if "PARENT" in answer.stdout:
                # pid 1 of its own namespace: its parent (the daemon) is not in it.
                assert "PARENT 0\n" in answer.stdout, answer.raw
    # The daemon, the zygote and the template are the same processes, alive.
    for pid in (debian.process.pid, *_children(debian.process.pid)):
        if _status(pid).get("Uid", "").split()[:1] == ["0"]:
            assert names.get(pid) == _status(pid).get("Name"), (pid, names)


def _run_processes(daemon: Daemon) -> list[tuple[int, dict[str, str]]]:
    """Every process holding a uid of the daemon's pool, with its status."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            status = _status(int(entry))
            uid = int(status.get("Uid", "-1").split()[0])
            if daemon.uid_min <= uid <= daemon.uid_max:
                found.append((int(entry), status))
    return found


def _strays(daemon: Daemon) -> list[tuple[int, dict[str, str]]]:
    """Processes of the pool's uids that are not a ready worker: a zombie, a survivor
    of a run, anything whose parent is not the daemon or that is not pid 1 of its own
    pid namespace."""
    return [
        (pid, status)
        for pid, status in _run_processes(daemon)
        if status.get("State", "").startswith(("Z", "X"))
        or int(status.get("PPid", "0")) != daemon.process.pid
        or status.get("NSpid", "").split()[-1:] != ["1"]
    ]


_FORK_BOMB_AND_EXIT = """
import os
kids = 0
try:
    while kids < 5000:
        if os.fork() == 0:
            import time
            time.sleep(60)
            os._exit(0)
        kids += 1
except OSError:
    pass
print('FORKED', kids > 0, flush=True)
import time
time.sleep(0.6)
raise SystemExit(0)  # pid 1 leaves with every child still asleep
"""

_DAEMONIZE = """
import os, signal, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        time.sleep(3)
        print('MARKER a grandchild outlived its run', flush=True)
        os._exit(0)
    os._exit(0)
time.sleep(0.6)
print('LEFT', flush=True)
"""

_RACING_EXITS = """
import os, sys, threading, time
threading.Thread(target=lambda: (time.sleep(0.6), os._exit(3))).start()
time.sleep(0.6)
sys.exit(5)
"""

_DEAF_PAST_DEADLINE = """
import os, signal, time
for sig in range(1, 32):
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (OSError, ValueError):
            pass
os.close(0)
os.close(1)
os.close(2)
while True:
    time.sleep(1)
"""


def test_odd_exits_leave_no_process_holding_a_uid_and_the_daemon_serves(
    debian: Daemon,  # noqa: F811
) -> None:
    science = "import numpy\n"
    pairs = (
        (Tenant("python3", _FORK_BOMB_AND_EXIT), Tenant("python3", science + _DAEMONIZE)),
        (Tenant("python3", science + _FORK_BOMB_AND_EXIT), Tenant("python3", _DAEMONIZE)),
    )
    for first, second in pairs:
        for answer in run_together(debian, first, second):
            assert "FORKED True" in answer.stdout or "LEFT" in answer.stdout, answer.raw
    # Alone (no second tenant): the deadline verdict, and two exits racing.
    for code in (_DEAF_PAST_DEADLINE, science + _DEAF_PAST_DEADLINE):
        deaf = debian.run(code, timeout=2)
        assert deaf["status"] == "timeout", deaf
    for code in (_RACING_EXITS, science + _RACING_EXITS):
        racing = debian.run(code)
        assert racing["status"] == "error" and racing["exit_code"] in (3, 5), racing
    # Within a while every process of the pool's uids is a ready worker again.
    deadline = time.monotonic() + 60
    while _strays(debian) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _strays(debian) == []
    assert _run_processes(debian), "no ready worker found: the check above saw nothing"
    for _ in range(20):
        for code in ("print('served')", "import numpy\nprint('served')"):
            served = debian.run(code)
            assert served["status"] == "ok" and served["stdout"] == "served\n", served
    debian.assert_healthy()


def _kill_ready_workers(daemon: Daemon) -> list[int]:
    """SIGKILL every ready worker from the host (as a crash or the OOM killer would)."""
    assert daemon.run("import numpy\nprint(1)")["status"] == "ok"  # both pools up
    ready = [pid for pid, _ in _run_processes(daemon)]
    assert ready, "no ready worker to kill"
    for pid in ready:
        os.kill(pid, 9)
    return ready


def _exited(pid: int) -> bool:
    """Whether `pid` has exited: a zombie (not reaped yet) or gone (no status)."""
    return _status(pid).get("State", "X").startswith(("Z", "X"))


def test_a_run_never_gets_a_ready_worker_that_already_died(
    debian: Daemon,  # noqa: F811
) -> None:
    # Once the killed workers have exited (the kernel's SIGKILL is asynchronous: a
    # worker killed while a job is handed to it answers 'killed', honestly), no run may
    # be given one of them.
    ready = _kill_ready_workers(debian)
    deadline = time.monotonic() + 30
    while not all(map(_exited, ready)):
        assert time.monotonic() < deadline, "the killed workers did not exit"
        time.sleep(0.05)
    statuses = [debian.run(code)["status"] for code in ("print(1)", "import numpy\nprint(1)")]
    assert statuses == ["ok", "ok"]


def test_ready_workers_that_die_while_waiting_are_reaped_and_replaced_without_a_run(
    debian: Daemon,  # noqa: F811
) -> None:
    # Killed from outside (a crash, the OOM killer) and never handed a job: each is
    # reaped within the pool's sweep (no zombie keeps its uid) and replaced.
    ready = _kill_ready_workers(debian)
    deadline = time.monotonic() + 60
    while (_strays(debian) or len(_run_processes(debian)) < len(ready)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert _strays(debian) == []
    assert not set(ready) & {pid for pid, _ in _run_processes(debian)}
    assert len(_run_processes(debian)) >= len(ready), "the pools were not refilled"
    assert debian.run("print(1)")["status"] == "ok"


def test_ready_workers_that_die_are_used_up_and_the_daemon_serves(
    debian: Daemon,  # noqa: F811
) -> None:
    # Each dead ready worker costs at most one run a 'killed' answer; then every run is
    # served and no process of the pool's uids is left but the new ready workers.
    ready = _kill_ready_workers(debian)
    runs = (
        ("python3", "print('served')"),
        ("python3", "import numpy\nprint('served')"),
        ("nodejs", "console.log('served')"),
    )
    for language, code in runs:
        answers = [debian.run(code, language) for _ in range(len(ready) + 5)]
        assert {a["status"] for a in answers} <= {"ok", "killed"}, answers
        assert [a["stdout"] for a in answers[-5:]] == ["served\n"] * 5, answers
    deadline = time.monotonic() + 60
    while _strays(debian) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _strays(debian) == []
    assert not set(ready) & {pid for pid, _ in _run_processes(debian)}
