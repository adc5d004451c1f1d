"""Red team, round 3: the prebuilt mount namespaces, the single-task run path and
forgetting the bootstrap modules before "ready".

- Mount API: two concurrent runs (tenants.run_together) try every call that reaches a
  mount namespace other than the private copy they live in, or changes that copy:
  open_tree, fsopen, fspick, move_mount, mount_setattr, listmount, statmount,
  pivot_root, chroot, umount2, name_to_handle_at, setns on every fd they hold, and
  look for a writable root or a /tmp that is the shared root's. Each call runs in a
  child (seccomp kills the caller); MARKER when one succeeded.
- Bootstrap modules: two concurrent runs, and a run whose job carries files and
  stdin (read, decoded and written after the worker already forgot its bootstrap),
  look for sandboxd, msgspec, seccomp, trio or a module of the daemon's venv in
  sys.modules, among the import hooks, importable, or registered again.
- Run path (DESIGN.md invariants 10, 17, 18): python3 and node runs that exit while
  their stdin is being fed, close or never read it, close their output early and
  keep running, leave a stopped child holding it, exit with a megabyte unread in
  each output pipe, print exactly the output cap or one byte past it, or flood it
  at their deadline beside another request on the same connection. Each gets its verdict
  and its whole output, no answer is lost or mixed up, and afterwards the daemon
  holds the fds it held before.
- Pools: the mount and module probes run as two plain runs, two runs of the
  data-science template's pool (its own root, entered from the template) and one
  of each; and across two reloads (host scans answered from hostscan's cache),
  with a pair in flight in the retired generation, after which the daemon holds
  no fd of that generation and no mount namespace's.
- From the host: the zygote holds one prebuilt namespace per root and each template
  only its own root's, and runs of every kind leave every one of them unchanged.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import signal
import socket
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import sandboxd
from sandboxd import debianpy
from sandboxd.config import LimitsConfig
from sandboxd.runtimes.python3 import JAIL_SITE_PACKAGES
from tests.integration.conftest import Daemon, start_daemon, stop_daemon
from tests.integration.tenants import MARKER, Answer, Tenant, run_together
from tests.integration.test_collusion_fs import mount_table
from tests.integration.test_redteam_mountns import _daemon_processes, _mounts, _namespace_fds

# --- the mount API -----------------------------------------------------------------

MOUNT_PROBE = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
AT_FDCWD = -100

def in_child(call):
    # True if the call returned a non-negative value; a seccomp kill is a refusal.
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if call() >= 0 else 1)
        except BaseException:
            os._exit(2)
    return os.waitpid(pid, 0)[1] == 0

def s(*args):
    return lambda: libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])

# struct mount_attr: clear MOUNT_ATTR_RDONLY, recursively (AT_RECURSIVE).
unlock = (ctypes.c_uint64 * 4)(0, 1, 0, 0)
# struct mnt_id_req (version 0): the root of the caller's mount namespace (LSMT_ROOT).
request = (ctypes.c_uint64 * 3)(24, 0xFFFFFFFFFFFFFFFF, 0)
ids = (ctypes.c_uint64 * 64)()
handle = ctypes.create_string_buffer(8 + 128)
ctypes.c_uint32.from_buffer(handle).value = 128
mount_id = ctypes.c_int()
calls = {
    "open_tree": s(428, AT_FDCWD, b"/", 0),
    "open_tree clone": s(428, AT_FDCWD, b"/tmp", 1 | 0x8000),
    "move_mount": s(429, AT_FDCWD, b"/tmp", AT_FDCWD, b"/usr", 0),
    "fsopen": s(430, b"tmpfs", 0),
    "fspick": s(433, AT_FDCWD, b"/", 0),
    "mount_setattr": s(442, AT_FDCWD, b"/", 0x8000, ctypes.byref(unlock), 32),
    "statmount": s(457, ctypes.byref(request), ctypes.byref(ids), 512, 0),
    "listmount": s(458, ctypes.byref(request), ctypes.byref(ids), 64, 0),
    "pivot_root": s(155, b"/tmp", b"/tmp"),
    "chroot": s(161, b"/tmp"),
    "umount2 /tmp": s(166, b"/tmp", 2),
    "umount2 /": s(166, b"/", 2),
    "name_to_handle_at": s(303, AT_FDCWD, b"/", handle, ctypes.byref(mount_id), 0),
    "unshare mnt": s(272, 0x00020000),
}
for name, call in calls.items():
    if in_child(call):
        print("MARKER", name, "succeeded")
held = []
for fd in range(0, 4096):
    try:
        held.append((fd, os.fstat(fd)))
    except OSError:
        pass
for fd, st in held:
    if in_child(s(308, fd, 0)):
        print("MARKER setns into fd", fd)
for path in ("/", "/usr", "/etc", "/dev"):
    if os.path.isdir(path) and not os.statvfs(path).f_flag & os.ST_RDONLY:
        print("MARKER writable mount at", path)
if os.stat("/tmp").st_dev == os.stat("/").st_dev:
    print("MARKER /tmp is the shared root's")
print("mount-probed", [fd for fd, _ in held])
time.sleep(1)  # long enough for the other run to overlap
"""


# Which pools a pair's runs go to, and over which route: two plain runs, two of the
# data-science template (a root of its own, entered from the template, which holds
# its prebuilt namespace's fd), and one of each.
PAIRS = [
    ("plain", "plain", "native"),
    ("plain", "plain", "dify"),
    ("science", "science", "native"),
    ("science", "plain", "native"),
]
PAIR_IDS = [f"{a}-and-{b}-{route}" for a, b, route in PAIRS]

# Put ahead of a probe for the data-science pool: its first import sends the run
# there (profiles.py), and a worker of that pool finds numpy warm.
SCIENCE = "import sys\nwarm = 'numpy' in sys.modules\nimport numpy, pandas, matplotlib.pyplot\n"
WARM = "print('warm', warm)\n"


def _in_pool(pool: str, probe: str) -> Tenant:
    return Tenant("python3", SCIENCE + probe + WARM if pool == "science" else probe)


def _check_pool(pool: str, answer: Answer) -> None:
    if pool == "science":
        assert "warm True" in answer.stdout, f"not a data-science worker: {answer.raw}"


@pytest.mark.parametrize(("first", "second", "route"), PAIRS, ids=PAIR_IDS)
def test_two_runs_get_no_mount_api_call_and_no_namespace_but_their_own_copy(
    daemon: Daemon, first: str, second: str, route: str
) -> None:
    answers = run_together(
        daemon, _in_pool(first, MOUNT_PROBE), _in_pool(second, MOUNT_PROBE), route
    )
    for pool, answer in zip((first, second), answers, strict=True):
        _check_pool(pool, answer)
        # Only stdio: no nsfs fd (the prebuilt namespaces' are closed by name).
        assert "mount-probed [0, 1, 2]" in answer.stdout, answer.raw


# --- the bootstrap modules ---------------------------------------------------------

BOOTSTRAP = ("sandboxd", "msgspec", "seccomp", "trio", "pystemd", "_distutils_hack")

MODULE_PROBE = """
import gc, importlib.util, sys, time
boot, daemon_dirs, trusted = BOOTSTRAP, DAEMON_DIRS, TRUSTED
for name, module in list(sys.modules.items()):
    if name.partition(".")[0] in boot:
        print("MARKER in sys.modules:", name)
    where = getattr(module, "__file__", None) or ""
    if where.startswith(daemon_dirs):
        print("MARKER a module of the daemon's:", name, where)
    elif where and not where.startswith(trusted):
        print("MARKER a module from outside the jail's places:", name, where)
for name in boot:
    if importlib.util.find_spec(name) is not None:
        print("MARKER importable:", name)
for hook in (*sys.meta_path, *sys.path_hooks, *sys.path_importer_cache.values()):
    owner = getattr(type(hook), "__module__", "") or ""
    if owner.partition(".")[0] in boot:
        print("MARKER an import hook of the bootstrap:", hook)
# The module objects themselves stay alive (the forgetting plan holds them, and the
# frames of the worker's own start() run under this code): found by gc, but they
# must not be what an import of any name gives.
found = [o for o in gc.get_objects() if type(o) is type(sys)]
alive = [m for m in found if m.__name__.partition(".")[0] in boot]
registered = {id(m) for m in sys.modules.values()}
for module in alive:
    if id(module) in registered:
        print("MARKER a bootstrap module registered under another name:", module.__name__)
# What else of the bootstrap code can reach (told, not a marker: reaching the
# worker's own code gains nothing the run does not have): the frames below this
# code's and the classes the bootstrap defined.
frame, below = sys._getframe(), []
while frame is not None:
    below.append(frame.f_globals.get("__name__"))
    frame = frame.f_back
classes, seen = [], set()
stack = [object]
while stack:
    cls = stack.pop()
    for sub in type.__subclasses__(cls) if isinstance(cls, type) else ():
        if id(sub) not in seen:
            seen.add(id(sub))
            stack.append(sub)
            if (getattr(sub, "__module__", "") or "").partition(".")[0] in boot:
                classes.append(sub.__module__)
print("modules-probed", len(alive), sorted({m.__name__.partition(".")[0] for m in alive}),
      "frames", below, "classes", len(classes), sorted(set(classes))[:8])
time.sleep(1)  # long enough for the other run to overlap
"""


def _module_probe() -> str:
    stdlib = sysconfig.get_paths()["stdlib"]
    trusted = (stdlib + "/", JAIL_SITE_PACKAGES + "/", debianpy.DIST_PACKAGES + "/", "/tmp/")
    daemon_dirs = (os.path.dirname(sandboxd.__file__) + "/",)
    if sys.prefix != sys.base_prefix:  # the daemon's venv
        daemon_dirs += (sys.prefix + "/",)
    return (
        MODULE_PROBE.replace("BOOTSTRAP", repr(BOOTSTRAP))
        .replace("DAEMON_DIRS", repr(daemon_dirs))
        .replace("TRUSTED", repr(trusted))
    )


@pytest.mark.parametrize(("first", "second", "route"), PAIRS, ids=PAIR_IDS)
def test_two_runs_find_no_bootstrap_module_registered_or_importable(
    daemon: Daemon, first: str, second: str, route: str
) -> None:
    probe = _module_probe()
    answers = run_together(daemon, _in_pool(first, probe), _in_pool(second, probe), route)
    for pool, answer in zip((first, second), answers, strict=True):
        _check_pool(pool, answer)
        assert "modules-probed" in answer.stdout, answer.raw


def test_a_job_with_files_and_stdin_brings_no_bootstrap_module_back(daemon: Daemon) -> None:
    """The job is read, decoded and its files written after the worker forgot its
    bootstrap: nothing of that may register a module again."""
    files = {f"input-{i}.bin": base64.b64encode(os.urandom(4096)).decode() for i in range(8)}
    answer = daemon.run(
        _module_probe().replace("MARKER", MARKER) + "print(len(sys.stdin.read()))\n",
        stdin="s" * 300_000,
        files=files,
    )
    assert answer["status"] == "ok", answer
    assert MARKER not in answer["stdout"] + answer["stderr"], answer
    assert answer["stdout"].endswith("\n300000\n"), answer
    daemon.assert_healthy()


# --- the run path ------------------------------------------------------------------

CAP = LimitsConfig().output_bytes
STDIN = "i" * (4 << 20)  # far past a pipe: the job pipe stays in the run's epoll set
BIG = 1 << 20  # what an unprivileged process may make one pipe hold (pipe-max-size)


@dataclass(frozen=True)
class Abuse:
    code: str
    stdin: str = ""
    timeout: float = 10.0
    status: str = "ok"
    stdout: str | None = None  # the whole stdout expected, when it is known
    stderr: str | None = None
    language: str = "python3"


ABUSES = {
    "exits-while-its-stdin-is-fed": Abuse("import os; os.read(0, 1)", STDIN),
    "closes-stdin-and-keeps-running": Abuse(
        "import os, time; os.close(0); time.sleep(0.5); print('after')", STDIN, stdout="after\n"
    ),
    "a-child-holds-stdin-the-worker-exits": Abuse(
        "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint('parent')",
        STDIN,
        stdout="parent\n",
    ),
    "never-reads-stdin-past-its-deadline": Abuse(
        "import time; time.sleep(60)", STDIN, 1.5, "timeout"
    ),
    "floods-past-the-cap-with-stdin-pending": Abuse(
        "import os\nwhile True: os.write(1, b'x' * 65536)", STDIN, status="output_limit"
    ),
    "closes-its-output-and-keeps-running": Abuse(
        "import os, time; os.close(1); os.close(2); time.sleep(0.5); os._exit(0)", stdout=""
    ),
    "a-stopped-child-holds-its-output": Abuse(
        "import os, signal\nif os.fork() == 0:\n    os.kill(os.getpid(), signal.SIGSTOP)\n"
        "    os._exit(0)\nprint('parent')",
        stdout="parent\n",
    ),
    "exits-with-a-megabyte-unread-in-each-pipe": Abuse(
        f"import fcntl, os\nfor fd in (1, 2): fcntl.fcntl(fd, 1031, {BIG})\n"
        f"os.write(1, b'o' * {BIG}); os.write(2, b'e' * {BIG}); os._exit(0)",
        stdout="o" * BIG,
        stderr="e" * BIG,
    ),
    "prints-exactly-the-cap-over-both-streams": Abuse(
        f"import os\nos.write(1, b'o' * {CAP // 2}); os.write(2, b'e' * {CAP - CAP // 2})\n"
        "os._exit(0)",
        stdout="o" * (CAP // 2),
        stderr="e" * (CAP - CAP // 2),
    ),
    "prints-one-byte-past-the-cap": Abuse(
        f"import os\nos.write(2, b'e' * {CAP // 2}); os.write(1, b'o' * {CAP - CAP // 2 + 1})\n"
        "os._exit(0)",
        status="output_limit",
    ),
    # The template's worker fds reach the daemon through the zygote: a copy of the job
    # pipe's write end kept by either would keep this read from its end of file.
    "science-reads-its-stdin-to-the-end": Abuse(
        SCIENCE + "print(len(sys.stdin.read()))\n" + WARM,
        STDIN,
        stdout=f"{len(STDIN)}\nwarm True\n",
    ),
    # node's bootstrap, not python's, reads the job and hands the rest to process.stdin.
    "node-exits-while-its-stdin-is-fed": Abuse(
        "process.stdin.once('data', () => process.exit(0));", STDIN, language="nodejs"
    ),
    "node-never-reads-stdin-past-its-deadline": Abuse(
        "setTimeout(() => {}, 60000);", STDIN, 1.5, "timeout", language="nodejs"
    ),
    "node-floods-past-the-cap-with-stdin-pending": Abuse(
        "const fs = require('fs'), b = Buffer.alloc(65536, 120);\n"
        "for (;;) { try { fs.writeSync(1, b); } catch (e) {} }",
        STDIN,
        status="output_limit",
        language="nodejs",
    ),
    "node-closes-its-output-and-keeps-running": Abuse(
        "const fs = require('fs'); fs.closeSync(1); fs.closeSync(2);\n"
        "setTimeout(() => process.exit(0), 500);",
        stdout="",
        language="nodejs",
    ),
}


def _fd_kinds(pid: int) -> collections.Counter[str]:
    """The daemon's open fds by kind: pipe, socket, anon_inode:[eventpoll], a path."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        kinds[target.split(":[")[0] if target.startswith(("pipe:", "socket:")) else target] += 1
    return kinds


def _settled_fds(daemon: Daemon, expected: collections.Counter[str] | None = None) -> Any:
    """The daemon's fds once its pools are refilled: the same in two readings a second
    apart (or equal to `expected`), polled for at most 30 s."""
    deadline = time.monotonic() + 30
    last = _fd_kinds(daemon.process.pid)
    while time.monotonic() < deadline:
        time.sleep(1)
        now = _fd_kinds(daemon.process.pid)
        if now == expected or (expected is None and now == last):
            return now
        last = now
    return last


def _abuse(daemon: Daemon, name: str) -> tuple[str, dict[str, Any]]:
    abuse = ABUSES[name]
    return name, daemon.run(abuse.code, abuse.language, stdin=abuse.stdin, timeout=abuse.timeout)


def test_runs_that_abuse_their_pipes_get_their_verdicts_and_leak_no_daemon_fd(
    daemon: Daemon,
) -> None:
    daemon.assert_healthy()
    before = _settled_fds(daemon)
    # Two at a time, so every run path meets another in flight.
    with ThreadPoolExecutor(2) as pool:
        answers = dict(pool.map(lambda name: _abuse(daemon, name), ABUSES))
    wrong = {}
    for name, answer in answers.items():
        abuse = ABUSES[name]
        total = len(answer["stdout"]) + len(answer["stderr"])
        if (
            answer["status"] != abuse.status
            or total > CAP
            or (abuse.status == "output_limit" and total != CAP)
            or answer["truncated"] != (abuse.status == "output_limit")
            or (abuse.stdout is not None and answer["stdout"] != abuse.stdout)
            or (abuse.stderr is not None and answer["stderr"] != abuse.stderr)
        ):
            wrong[name] = {k: v for k, v in answer.items() if k not in ("stdout", "stderr")} | {
                "stdout_bytes": len(answer["stdout"]),
                "stderr_bytes": len(answer["stderr"]),
            }
    assert wrong == {}, wrong
    daemon.assert_healthy()
    after = _settled_fds(daemon, before)
    assert after == before, f"daemon fds before {before}, after {after}"


DEADLINE_FLOOD = """
import os, threading, time
time.sleep(WAIT)
def flood(fd):
    while True:
        os.write(fd, b'z' * 65536)
for fd in (1, 2):
    threading.Thread(target=flood, args=(fd,), daemon=True).start()
for _ in range(3):
    if os.fork() == 0:
        flood(1)
time.sleep(60)
"""


def test_a_flood_at_the_deadline_loses_no_answer_on_the_same_connection(daemon: Daemon) -> None:
    """Two requests on one connection: one floods its output from threads and children
    from just before its deadline, the other prints a known pattern. Each answer
    comes back under its own id: the flood cut at the cap, the pattern whole."""
    pattern = "".join(chr(97 + i % 26) for i in range(300_000))
    requests = [
        {"id": "flood", "language": "python3", "timeout": 2.0,
         "code": DEADLINE_FLOOD.replace("WAIT", "1.9")},
        {"id": "plain", "language": "python3", "timeout": 10.0,
         "code": f"import time\ntime.sleep(1.5)\nprint({pattern!r})"},
    ]  # fmt: skip
    answers = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(daemon.socket_path)
        sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        lines = sock.makefile("rb")
        for _ in requests:
            answer = json.loads(lines.readline())
            answers[answer["id"]] = answer
    flood, plain = answers["flood"], answers["plain"]
    assert flood["status"] in ("timeout", "output_limit"), flood["status"]
    assert len(flood["stdout"]) + len(flood["stderr"]) <= CAP
    assert set(flood["stdout"] + flood["stderr"]) <= {"z"}
    assert plain["status"] == "ok", plain
    assert plain["stdout"] == pattern + "\n"
    daemon.assert_healthy()


# --- reloads -----------------------------------------------------------------------


def test_reloads_with_runs_in_flight_leave_fresh_namespaces_and_no_daemon_fd(
    tmp_path: Path,
) -> None:
    """Two reloads (the host scans answered from the cache the second and third time),
    each while a pair of probes is in flight in the old generation; a pair in the new
    one after each. Every pair finds only its own copy of its root, and after each
    reload the daemon holds what it held before: no fd of a retired generation
    (zygote, templates, their workers' pipes) and no mount namespace's."""
    daemon = start_daemon(tmp_path)
    try:
        daemon.assert_healthy()
        before = _settled_fds(daemon)
        assert not [kind for kind in before if kind.startswith("mnt:")], before
        for reload in (1, 2):
            in_flight = ThreadPoolExecutor(1).submit(
                run_together,
                daemon,
                Tenant("python3", MOUNT_PROBE),
                _in_pool("science", MOUNT_PROBE),
            )
            daemon.process.send_signal(signal.SIGHUP)
            for pool, answer in zip(("plain", "science"), in_flight.result(), strict=True):
                _check_pool(pool, answer)
                assert "mount-probed [0, 1, 2]" in answer.stdout, answer.raw
            deadline = time.monotonic() + 60
            while daemon.log_path.read_text().count("reloaded: ") < reload:
                assert time.monotonic() < deadline, daemon.log_path.read_text()
                time.sleep(0.1)
            for probe in (MOUNT_PROBE, _module_probe()):
                run_together(daemon, Tenant("python3", probe), _in_pool("science", probe))
            after = _settled_fds(daemon, before)
            assert after == before, f"after reload {reload}: fds before {before}, after {after}"
    finally:
        stop_daemon(daemon)
    assert daemon.process.returncode == 0, daemon.log_path.read_text()


# --- the prebuilt namespaces, from the host ----------------------------------------


def _prebuilt(daemon: Daemon) -> dict[int, dict[str, dict[str, tuple[str, str]]]]:
    """Zygote or template pid -> the prebuilt mount namespaces it holds fds of, each
    as its mount table (mount point -> options, propagation)."""
    held = {}
    for pid in _daemon_processes(daemon)[0]:
        tables = {}
        for inode, path in _namespace_fds(pid).items():
            if (table := mount_table(path)) is not None:
                tables[inode] = _mounts(table)
        held[pid] = tables
    return held


def test_runs_of_every_kind_change_no_prebuilt_namespace_and_templates_hold_their_own(
    daemon: Daemon,
) -> None:
    """White box: the zygote holds one prebuilt namespace per root, each template only
    its own root's; after plain, data-science, node, timed-out and killed runs (each
    unsharing a copy and mounting its /tmp there) every one holds the same mounts."""
    # Once every pool has served (the data-science template is started with its pool).
    assert daemon.run(SCIENCE + WARM)["stdout"] == "warm True\n"
    daemon.assert_healthy()
    before = _prebuilt(daemon)
    counts = sorted(len(tables) for tables in before.values())
    assert len(counts) >= 2 and counts[:-1] == [1] * (len(counts) - 1), before
    runs = [
        ("python3", "print('plain')", 10.0),
        ("python3", SCIENCE + "print('science')", 10.0),
        ("nodejs", "console.log('node')", 10.0),
        ("python3", "import time; time.sleep(60)", 1.0),
        ("python3", SCIENCE + "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", 10.0),
    ]
    with ThreadPoolExecutor(2) as pool:
        statuses = list(
            pool.map(lambda run: daemon.run(run[1], run[0], timeout=run[2])["status"], runs * 2)
        )
    assert statuses == ["ok", "ok", "ok", "timeout", "ok"] * 2, statuses
    after = _prebuilt(daemon)
    assert after == before
    daemon.assert_healthy()
