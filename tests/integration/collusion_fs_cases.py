"""Attack code for the filesystem channels between concurrent runs, as data.

Stdlib only, no imports of the project: tests/integration/test_collusion_fs.py
sends these through tenants.run_together, and the guest system test
(tests/system/collusion.py) sends the same code to the packaged daemon on the
guest's 6.1 kernel. Each snippet prints the word MARKER only when the escape
worked; the sender replaces it with its marker before sending.
"""

from __future__ import annotations


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
SEND_ROOT_FD = send_fds("sandboxd-isofs-root", '[os.open("/", os.O_RDONLY)]', 5)
WALK_TO_HOST = (
    receive_fds("sandboxd-isofs-root")
    + """
if fds:
    os.fchdir(fds[0])
    here, up = os.stat("."), os.stat("..")  # stat needs no search right on ".."
    if (here.st_dev, here.st_ino) != (up.st_dev, up.st_ino):
        print("MARKER '..' leads out of the other run's root")
    for _ in range(30):
        try:
            os.chdir("..")
        except OSError as error:  # a host directory this uid may not enter
            print("walk stopped:", error)
            break
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


# A shared stdlib file both python roots hold at the same path (the same inode).
SHARED_FILE = "os.__file__"

HOLD_LOCKS = f"""
import fcntl, os, struct, time
path = {SHARED_FILE}
held = []
for name, take in (
    ("flock", lambda fd: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)),
    ("posix", lambda fd: fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)),
    ("ofd", lambda fd: fcntl.fcntl(fd, 37, struct.pack("hhqqi", fcntl.F_RDLCK, 0, 0, 0, 0))),
    ("lease", lambda fd: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)),
):
    fd = os.open(path, os.O_RDONLY)
    try:
        take(fd)
        held.append(name)
    except OSError as error:
        print(name, "refused:", error)
print("holding", held, flush=True)
time.sleep(3)
"""
PROBE_LOCKS = f"""
import fcntl, os, struct, time
path = {SHARED_FILE}
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        print("MARKER flock of the other run seen")
    except OSError:
        pass
    for cmd in (fcntl.F_GETLK, 36):  # POSIX and OFD: who holds a conflicting lock?
        try:
            got = fcntl.fcntl(fd, cmd, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
            if struct.unpack("hhqqi", got)[0] != fcntl.F_UNLCK:
                print("MARKER lock of the other run seen by", cmd)
        except OSError:
            pass
    os.close(fd)
    time.sleep(0.1)
"""


# dnotify and inotify on a directory both roots hold (the TLS trust store); the
# other run reads a file in it, and a watcher that sees it prints MARKER.
WATCHED_DIR = "/etc/ssl/certs"
WATCH = f"""
import ctypes, fcntl, os, signal, time
seen = []
signal.signal(signal.SIGIO, lambda *_: seen.append("dnotify"))
signal.signal(signal.SIGRTMIN, lambda *_: seen.append("dnotify"))
fd = os.open("{WATCHED_DIR}", os.O_RDONLY)
try:
    fcntl.fcntl(fd, fcntl.F_NOTIFY, fcntl.DN_ACCESS | fcntl.DN_MULTISHOT)
    print("dnotify watching")
except OSError as error:
    print("dnotify refused:", error)
libc = ctypes.CDLL(None, use_errno=True)
ino = libc.inotify_init1(os.O_NONBLOCK)
if ino >= 0 and libc.inotify_add_watch(ino, b"{WATCHED_DIR}", 0x1 | 0x20) >= 0:  # ACCESS|OPEN
    print("inotify watching")
else:
    print("inotify refused:", os.strerror(ctypes.get_errno()))
time.sleep(3)
if ino >= 0:
    try:
        if os.read(ino, 4096):
            seen.append("inotify")
    except OSError:
        pass
if seen:
    print("MARKER another run's reads seen by", sorted(set(seen)))
"""
READ_WATCHED = {
    "python3": f"""
import os, time
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    for name in os.listdir("{WATCHED_DIR}")[:20]:
        try:
            open(os.path.join("{WATCHED_DIR}", name), "rb").read(1)
        except OSError:
            pass
    time.sleep(0.05)
""",
    "nodejs": f"""
const fs = require("fs");
const end = Date.now() + 3000;
const tick = () => {{
  for (const name of fs.readdirSync("{WATCHED_DIR}").slice(0, 20)) {{
    try {{ fs.readFileSync("{WATCHED_DIR}/" + name); }} catch (e) {{}}
  }}
  if (Date.now() < end) setTimeout(tick, 50);
}};
tick();
""",
}


SHM_WRITE = """
import os, time
open("/dev/shm/sandboxd-isofs-shm", "w").write("x")
time.sleep(2)
"""
SHM_LOOK = """
import os, time
for _ in range(30):
    if os.path.exists("/dev/shm/sandboxd-isofs-shm"):
        print("MARKER the other run's /dev/shm file")
        break
    time.sleep(0.1)
"""


# A (timeout 2) passes its stdout and stderr to B and exits; B writes into them and,
# once A's deadline is long past, writes MARKER. A's answer must never hold it. A waits
# for a taker for 1 s only: with no taker (runs share no socket) it ends by itself
# well within its deadline, so both runs start and end.
GIVE_STDOUT = send_fds("sandboxd-isofs-stdout", "[1, 2]", 1, then="pass")
WRITE_INTO_OTHER = (
    receive_fds("sandboxd-isofs-stdout")
    + """
if fds:
    print("holding the other run's stdout", flush=True)
    start = time.monotonic()
    while time.monotonic() - start < 8:
        late = time.monotonic() - start > 4
        for fd in fds:
            try:
                os.write(fd, b"MARKER late\\n" if late else b"early\\n")
            except OSError:
                pass
        time.sleep(0.2)
"""
)
