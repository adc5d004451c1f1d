"""Red team: channels between two concurrent runs that the isolation tests did not try.

DESIGN.md invariants 4, 6 and 15. The attacker writes both runs, sent at once by
tenants.run_together; a run prints MARKER only when the channel worked:
- signals: one run sends SIGUSR1 to every pid it can name (and to -1), the other
  prints MARKER from its handler;
- SysV IPC and POSIX message queues: one run creates a message queue, a shared
  memory segment and a semaphore set under a fixed key, the other looks them up by
  key and by the first ids a namespace hands out (the calls run in a child, as
  seccomp kills the process that makes them);
- UDP hole punching between runs with network ([network] mode = "allow"), which
  share the egress namespace: each run sends from one socket to every ephemeral
  port of the namespace's loopback, so the later run's packet to the earlier
  run's port is, to conntrack, a reply of the earlier one's. The namespace's
  input chain refuses whatever arrives on lo (jail/network.py, NAMESPACE_RULES).
- the page cache of a shared read-only file: one run reads the slots of its message
  again and again, the other evicts the file and times one read per slot (a cached
  slot answers in about a microsecond). seccomp refuses the evicting advice
  (jail/seccomp.py, ARG_RULES: fadvise64 and madvise).
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import Daemon
from tests.integration.tenants import DIRECTION_IDS, DIRECTIONS, Tenant, run_together
from tests.integration.test_collusion_net import allow_daemon  # noqa: F401 (a fixture)

WINDOW_S = 3  # how long the receiving side waits for the other

# --- signals --------------------------------------------------------------------------

SIGNAL_SEND = {
    "python3": f"""
import os, signal, time
end = time.monotonic() + {WINDOW_S}
sent = 0
while time.monotonic() < end:
    for pid in range(1, 70000):
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGUSR1)
            sent += 1
        except OSError:
            pass
    try:
        os.kill(-1, signal.SIGUSR1)
    except OSError:
        pass
    time.sleep(0.2)
print("signals delivered to", sent, "pids of this run's own pid namespace")
""",
    "nodejs": f"""
const end = Date.now() + {WINDOW_S * 1000};
let sent = 0;
function round() {{
  for (let pid = 1; pid < 70000; pid++) {{
    if (pid === process.pid) continue;
    try {{ process.kill(pid, 'SIGUSR1'); sent++; }} catch (e) {{}}
  }}
  if (Date.now() < end) setTimeout(round, 200);
  else console.log('signals delivered to', sent, "pids of this run's own pid namespace");
}}
round();
""",
}

SIGNAL_RECEIVE = {
    "python3": f"""
import signal, time
signal.signal(signal.SIGUSR1, lambda *_: print("MARKER a signal from another run"))
time.sleep({WINDOW_S})
""",
    "nodejs": f"""
process.on('SIGUSR1', () => console.log('MARKER a signal from another run'));
setTimeout(() => {{}}, {WINDOW_S * 1000});
""",
}


@pytest.mark.parametrize(("sender", "receiver", "route"), DIRECTIONS, ids=DIRECTION_IDS)
def test_a_run_cannot_signal_another_run(
    daemon: Daemon, sender: str, receiver: str, route: str
) -> None:
    run_together(
        daemon,
        Tenant(sender, SIGNAL_SEND[sender]),
        Tenant(receiver, SIGNAL_RECEIVE[receiver]),
        route,
    )


# --- SysV IPC and POSIX message queues ------------------------------------------------

# Each probe runs in a forked child: a call outside the allow-list kills the caller.
_IPC_PRELUDE = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
IPC_CREAT, KEY = 0o1000, 0x5BD0C0DE

def in_child(name, call):
    pid = os.fork()
    if pid == 0:
        try:
            result = call()
            print(name, "returned", result, "errno", ctypes.get_errno(), flush=True)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        print(name, "closed: the child was killed by signal", os.WTERMSIG(status), flush=True)
"""

IPC_OFFER = (
    _IPC_PRELUDE
    + f"""
in_child("msgget", lambda: libc.msgget(KEY, IPC_CREAT | 0o666))
in_child("shmget", lambda: libc.shmget(KEY, 4096, IPC_CREAT | 0o666))
in_child("semget", lambda: libc.semget(KEY, 1, IPC_CREAT | 0o666))
in_child("mq_open", lambda: libc.mq_open(b"/sbx-redteam", os.O_CREAT | os.O_RDWR, 0o666, None))
time.sleep({WINDOW_S})
"""
)

IPC_LOOK = (
    _IPC_PRELUDE
    + """
time.sleep(0.5)

def found(name, call):
    def look():
        result = call()
        if result >= 0:
            print("MARKER", name, "found another run's object:", result, flush=True)
        return result
    in_child(name, look)

found("msgget", lambda: libc.msgget(KEY, 0))
found("shmget", lambda: libc.shmget(KEY, 0, 0))
found("semget", lambda: libc.semget(KEY, 0, 0))
found("mq_open", lambda: libc.mq_open(b"/sbx-redteam", os.O_RDWR))
# The first ids a fresh IPC namespace hands out: 0 and the next sequence numbers.
IPC_STAT = 2
buffer = ctypes.create_string_buffer(512)
for ipc_id in (0, 1, 32768, 65536):
    found("msgctl", lambda: libc.msgctl(ipc_id, IPC_STAT, buffer))
    found("shmctl", lambda: libc.shmctl(ipc_id, IPC_STAT, buffer))
"""
)


@pytest.mark.parametrize("route", ["native", "dify"])
def test_sysv_and_posix_ipc_do_not_cross_runs(daemon: Daemon, route: str) -> None:
    answers = run_together(daemon, Tenant("python3", IPC_OFFER), Tenant("python3", IPC_LOOK), route)
    # The probes ran (each printed its outcome), so the absence of MARKER means something.
    for answer in answers:
        assert answer.stdout.count("closed:") + answer.stdout.count("returned") >= 4, answer.raw


# --- UDP hole punching between runs with network --------------------------------------

# Send from one socket to every ephemeral port of the namespace's loopback, then
# listen; `delay` puts the second run's sweep after the first's.
_UDP_SWEEP = """
import socket, time
time.sleep({delay})
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
for port in range(32768, 61000):
    try:
        s.sendto(b"sweep", ("127.0.0.1", port))
    except OSError:
        pass
print("swept from", s.getsockname())
s.settimeout(0.2)
end = time.monotonic() + {listen}
while time.monotonic() < end:
    try:
        data, peer = s.recvfrom(64)
    except OSError:
        continue
    print("MARKER heard", data, "from", peer)
    s.sendto(b"back", peer)
"""
UDP_FIRST = _UDP_SWEEP.format(delay=0, listen=WINDOW_S + 1)
UDP_LATE = _UDP_SWEEP.format(delay=1.5, listen=2)


def test_network_runs_cannot_punch_udp_holes_to_each_other(
    allow_daemon: Daemon,  # noqa: F811 (the fixture imported above)
) -> None:
    # The Dify route asks for network (tenants.py); both sweeps ran to the end.
    answers = run_together(
        allow_daemon, Tenant("python3", UDP_FIRST), Tenant("python3", UDP_LATE), "dify"
    )
    for answer in answers:
        assert "swept from ('0.0.0.0'," in answer.stdout, answer.raw


# --- the page cache of the shared read-only files -------------------------------------

# A shared stdlib file no interpreter maps: one run reads a set of its pages again and
# again, the other evicts the file from the page cache and times one read per page
# (a cached page answers in about a microsecond, an evicted one from the disk).
SHARED_PAGES_FILE = "/usr/lib/python3.11/config-3.11-x86_64-linux-gnu/libpython3.11.a"
# Slots 128 KiB apart: the page cache may hold a file in folios larger than a page.
SLOT = 128 * 1024
MESSAGE_PAGES = (5, 17, 33, 60)

PAGE_SEND = f"""
import os, time
fd = os.open({SHARED_PAGES_FILE!r}, os.O_RDONLY)
try:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
except OSError as error:
    print("no fadvise:", repr(error))
end = time.monotonic() + {WINDOW_S + 1}
while time.monotonic() < end:
    for page in {MESSAGE_PAGES!r}:
        os.pread(fd, 1, page * {SLOT})
    time.sleep(0.002)
"""

PAGE_RECEIVE = f"""
import mmap, os, time
fd = os.open({SHARED_PAGES_FILE!r}, os.O_RDONLY)

def evict():
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as error:
        print("no fadvise:", repr(error))
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
            view.madvise(21)  # MADV_PAGEOUT
    except OSError as error:
        print("no madvise(MADV_PAGEOUT):", repr(error))

time.sleep(0.5)
hits = 0
for _ in range(8):
    evict()
    time.sleep(0.15)
    times = []
    for page in range(64):
        start = time.perf_counter()
        os.pread(fd, 1, page * {SLOT})
        times.append(time.perf_counter() - start)
    fast = sorted(range(64), key=times.__getitem__)[:{len(MESSAGE_PAGES)}]
    slow_median = sorted(times)[32]
    if tuple(sorted(fast)) == {MESSAGE_PAGES!r} and max(times[p] for p in fast) * 5 < slow_median:
        hits += 1
if hits >= 4:
    print("MARKER read the other run's pages from the page cache", hits, "of 8 rounds")
print("page rounds decoded:", hits)
"""


@pytest.mark.parametrize("route", ["native", "dify"])
def test_the_page_cache_of_shared_files_carries_no_message(daemon: Daemon, route: str) -> None:
    answers = run_together(
        daemon, Tenant("python3", PAGE_SEND), Tenant("python3", PAGE_RECEIVE), route
    )
    assert "page rounds decoded:" in answers[1].stdout, answers[1].raw
    # Both eviction calls were refused as clean errors, not kills.
    assert "no fadvise: OSError(22" in answers[1].stdout, answers[1].raw
    assert "no madvise(MADV_PAGEOUT): OSError(22" in answers[1].stdout, answers[1].raw
