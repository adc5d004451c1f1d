"""Red team: the prebuilt mount namespaces (jail/rootfs.py prebuild, enter).

Each worker enters a private copy of its root's prebuilt mount namespace, which
the zygote keeps alive by an nsfs fd. Two runs at once (tenants.run_together,
both written by the attacker) try to reach that namespace, or each other's
mounts: a /tmp that is not their own, the other's files by any path, the
namespace's fds, /proc, the zygote's paths, writing into the shared root,
mounting, setns and unshare. A run prints MARKER only when one worked. From the
host, the white-box test reads the mount namespaces of the prebuilt roots and of
every live worker: one namespace per worker, none of them a prebuilt one, no
nsfs fd in any worker, each holding its root's mounts and its own /tmp only,
all read-only but /tmp and none propagating.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon
from tests.integration.tenants import DIRECTIONS, Tenant, run_together
from tests.integration.test_collusion_fs import mount_table

# Python code; SELF_NAME and OTHER_NAME are the two runs' names, ZYGOTE_PATHS the host paths of
# the zygote's root templates. Each run opens its /tmp to the other (collusion),
# leaves a file named SELF_NAME in it, and looks for OTHER_NAME's for two seconds.
PROBE = """
import ctypes, os, stat, time
libc = ctypes.CDLL(None, use_errno=True)
me, other = "SELF_NAME", "OTHER_NAME"

def in_child(call):
    # Refused calls kill the caller (seccomp): try each in a child; True if it passed.
    pid = os.fork()
    if pid == 0:
        os._exit(0 if call() == 0 else 1)
    return os.waitpid(pid, 0)[1] == 0

own = os.stat("/tmp")
if own.st_uid != os.getuid():
    print("MARKER /tmp is another run's mount, uid", own.st_uid)
os.chmod("/tmp", 0o1777)
with open(f"/tmp/{me}", "w") as mine:
    mine.write(me)
os.chmod(f"/tmp/{me}", 0o666)
deadline = time.monotonic() + 2
while time.monotonic() < deadline:
    now = os.stat("/tmp")
    if (now.st_dev, now.st_uid) != (own.st_dev, own.st_uid):
        print("MARKER /tmp changed to another mount, uid", now.st_uid)
        break
    for path in (f"/tmp/{other}", f"/dev/shm/{other}", f"/{other}"):
        if os.path.exists(path):
            print("MARKER found the other run's file at", path)
    time.sleep(0.05)
for parent, _, names in os.walk("/"):
    if other in names:
        print("MARKER found the other run's file in", parent)
for path in ("/proc", "/proc/1/ns/mnt", "/proc/self/ns/mnt", *ZYGOTE_PATHS):
    if os.path.lexists(path):
        print("MARKER reachable:", path)
for path in ("/planted", "/usr/planted", "/etc/planted", "/dev/planted"):
    try:
        open(path, "w").close()
        print("MARKER wrote", path)
    except OSError:
        pass
held = []
for fd in range(3, 1024):
    try:
        held.append((fd, os.fstat(fd)))
    except OSError:
        pass
print("fds", [fd for fd, _ in held])
for fd, st in held:
    # nsfs: an empty read-only regular file with a namespace's inode number.
    if stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_ino >= 0xEFFFF000:
        print("MARKER holds a namespace's fd", fd, st.st_ino)
    if in_child(lambda: libc.setns(fd, 0)):
        print("MARKER setns into fd", fd)
if in_child(lambda: libc.unshare(0x00020000)):
    print("MARKER unshare(CLONE_NEWNS)")
if in_child(lambda: libc.mount(b"x", b"/tmp", b"tmpfs", 0, None)):
    print("MARKER mounted a tmpfs")
if in_child(lambda: libc.mount(None, b"/", None, 32 | 4096, None)):  # MS_REMOUNT | MS_BIND
    print("MARKER remounted the root writable")
print("probed")
"""

# Node can only look and write: the other run's file by path, the zygote's paths.
NODE_PROBE = """
const fs = require('fs');
const own = fs.statSync('/tmp');
if (own.uid !== process.getuid()) console.log('MARKER /tmp is another run\\'s mount');
fs.chmodSync('/tmp', 0o1777);
fs.writeFileSync('/tmp/SELF_NAME', 'SELF_NAME', {mode: 0o666});
const deadline = Date.now() + 2000;
const places = ['/tmp/OTHER_NAME', '/dev/shm/OTHER_NAME', '/OTHER_NAME', '/proc'];
const look = () => {
  for (const path of [...places, ...ZYGOTE_PATHS]) {
    if (fs.existsSync(path)) console.log('MARKER reachable:', path);
  }
  for (const path of ['/planted', '/usr/planted']) {
    try { fs.writeFileSync(path, 'x'); console.log('MARKER wrote', path); } catch (e) {}
  }
  if (Date.now() < deadline) setTimeout(look, 50); else console.log('probed');
};
look();
"""

TO_PY = [(a, b, route) for a, b, route in DIRECTIONS if b == "python3"]


def _zygote_paths(daemon: Daemon) -> list[str]:
    """Host paths of the zygote's root templates (in the runtime dir), as the jail
    would name them."""
    return [daemon.runtime_dir, *(str(p) for p in Path(daemon.runtime_dir).glob("root-*"))]


def _probe(language: str, me: str, other: str, daemon: Daemon) -> Tenant:
    code = PROBE if language == "python3" else NODE_PROBE
    code = code.replace("OTHER_NAME", other).replace("SELF_NAME", me)
    return Tenant(language, code.replace("ZYGOTE_PATHS", repr(_zygote_paths(daemon))))


@pytest.mark.parametrize(
    ("first", "second", "route"), TO_PY, ids=[f"{a}-and-{b}-{r}" for a, b, r in TO_PY]
)
def test_two_runs_reach_neither_the_prebuilt_namespace_nor_each_others_mounts(
    daemon: Daemon, first: str, second: str, route: str
) -> None:
    answers = run_together(
        daemon,
        _probe(first, "sandboxd-mntns-a", "sandboxd-mntns-b", daemon),
        _probe(second, "sandboxd-mntns-b", "sandboxd-mntns-a", daemon),
        route,
    )
    for answer in answers:
        assert "probed" in answer.stdout, answer.raw


def _daemon_processes(daemon: Daemon) -> tuple[list[int], list[int]]:
    """(the daemon's zygotes and templates, its workers): children of the daemon; a
    worker is pid 1 of a pid namespace of its own, and counts once it has dropped to
    a uid of the daemon's range (jailed)."""
    zygotes, workers = [], []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if int(fields["PPid"]) != daemon.process.pid:
            continue
        uid = int(fields["Uid"].split()[0])
        if len(fields["NSpid"].split()) == 1:
            zygotes.append(int(entry))
        elif daemon.uid_min <= uid <= daemon.uid_max:
            workers.append(int(entry))
    return zygotes, workers


def _namespace_fds(pid: int) -> dict[str, str]:
    """The mount namespaces `pid` holds fds of: "mnt:[inode]" -> a path to open it by."""
    held = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("mnt:"):
            held[target] = f"/proc/{pid}/fd/{fd}"
    return held


def _mounts(table: list[list[str]]) -> dict[str, tuple[str, str]]:
    """Mount point -> (its per-mount options, its optional fields: propagation)."""
    found = {}
    for line in table:
        separator = line.index("-")
        found[line[4]] = (line[5], " ".join(line[6:separator]))
    return found


def test_each_worker_has_a_private_copy_of_its_prebuilt_root_and_no_namespace_fd(
    daemon: Daemon,
) -> None:
    """White box: while a python3 and a nodejs run sleep, read from the host the
    prebuilt namespaces (through the zygote's fds) and every live worker's."""
    sleepers = [
        threading.Thread(target=daemon.run, args=("import time; time.sleep(3)", "python3")),
        threading.Thread(target=daemon.run, args=("setTimeout(() => {}, 3000)", "nodejs")),
    ]
    for thread in sleepers:
        thread.start()
    prebuilt: dict[str, dict[str, tuple[str, str]]] = {}
    seen: dict[int, tuple[str, dict[str, tuple[str, str]]]] = {}
    leaked: dict[int, dict[str, str]] = {}
    while any(thread.is_alive() for thread in sleepers):
        zygotes, workers = _daemon_processes(daemon)
        for zygote in zygotes:
            for inode, path in _namespace_fds(zygote).items():
                if inode not in prebuilt and (table := mount_table(path)) is not None:
                    prebuilt[inode] = _mounts(table)
        for pid in workers:
            try:
                if held := _namespace_fds(pid):
                    leaked[pid] = held
                inode = os.readlink(f"/proc/{pid}/ns/mnt")
            except OSError:
                continue  # exited meanwhile
            if pid not in seen and (table := mount_table(f"/proc/{pid}/ns/mnt")) is not None:
                seen[pid] = inode, _mounts(table)
    for thread in sleepers:
        thread.join()
    assert leaked == {}, leaked
    # One per root (python3, nodejs), each pivoted into its root: only read-only,
    # private mounts, its root the root template's tmpfs.
    assert len(prebuilt) >= 2, prebuilt
    for mounts in prebuilt.values():
        assert all("ro" in options.split(",") for options, _ in mounts.values()), mounts
        assert all(propagation == "" for _, propagation in mounts.values()), mounts
    assert len(seen) >= 2, seen
    namespaces = [inode for inode, _ in seen.values()]
    assert len(set(namespaces)) == len(namespaces), seen  # one each
    assert not set(namespaces) & set(prebuilt), seen  # none lives in a prebuilt one
    for pid, (_, mounts) in seen.items():
        tmp_options, tmp_propagation = mounts.pop("/tmp")
        assert "rw" in tmp_options.split(",") and tmp_propagation == "", (pid, tmp_options)
        # Exactly one prebuilt root's mounts, and nothing else.
        assert mounts in list(prebuilt.values()), (pid, sorted(mounts))
    daemon.assert_healthy()
