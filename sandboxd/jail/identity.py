"""Identity: a uid/gid from the pool per live worker (daemon side), the drop (worker side),
and the host-wide claim that keeps two daemons off the same uid range."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re

from sandboxd.jail import libc

# Highest capability number the kernel may know; PR_CAPBSET_DROP on an unknown one is EINVAL.
_CAP_LAST_MAX = 63


class UidPoolExhausted(OSError):
    """Every uid of the pool belongs to a live worker ([jail] uid_min..uid_max too small)."""


class UidPool:
    """Hands out uids so that no two live workers share one (invariant 4)."""

    def __init__(self, first: int, last: int) -> None:
        self._free = list(range(last, first - 1, -1))
        self._used: set[int] = set()

    def acquire(self) -> int:
        if not self._free:
            raise UidPoolExhausted("every uid of the worker pool is in use")
        uid = self._free.pop()
        self._used.add(uid)
        return uid

    def release(self, uid: int) -> None:
        """Give a uid back; only once every process that had it is dead."""
        self._used.remove(uid)
        self._free.insert(0, uid)


def drop(uid: int) -> None:
    """Become uid:uid with no groups and no capabilities, for good; verify it."""
    for cap in range(_CAP_LAST_MAX + 1):
        try:
            libc.prctl(libc.PR_CAPBSET_DROP, cap)
        except OSError:
            break  # past the kernel's last capability
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
        raise PermissionError("identity drop did not take effect")
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    libc.prctl(libc.PR_SET_DUMPABLE, 0)


# --- One daemon per uid range: a lock file per claimed range, flock-held for life ---

# Shared by every sandboxd on the host, whatever its runtime_dir: that is the point.
UID_LOCK_DIR = "/run/sandboxd-uid-ranges"
# Held only while a daemon compares its range with the others and writes its own lock.
_GUARD = ".guard"
_RANGE_FILE = re.compile(r"(\d+)-(\d+)\.lock")


class UidRangeInUse(OSError):
    """Another live daemon holds a uid range that overlaps this daemon's [jail] range."""


class UidClaim:
    """This daemon's hold on uid_min..uid_max: an open, flock-held file in UID_LOCK_DIR.

    The kernel drops the flock when the daemon dies, however it dies, so a lock file
    left by a dead daemon is stale and the next claimant removes it. close() gives the
    range back.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    def close(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1


def _held_by_live_daemon(path: str) -> bool:
    """Whether a daemon holds the lock at path; a stale one (its daemon died) is removed."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    os.unlink(path)  # safe: every claimant creates its lock under the guard we hold
    return False


def _holder(path: str) -> str:
    try:
        with open(path, encoding="ascii") as file:
            return f"pid {int(file.read().strip())}"
    except (OSError, ValueError):
        return "a running daemon"


def claim_uid_range(first: int, last: int, lock_dir: str = UID_LOCK_DIR) -> UidClaim:
    """Claim first..last for this daemon, or raise UidRangeInUse naming the other range.

    Race-free: comparison and creation happen under an exclusive flock on the guard
    file, so of two daemons starting at once with overlapping ranges one refuses.
    """
    os.makedirs(lock_dir, mode=0o755, exist_ok=True)
    guard = os.open(os.path.join(lock_dir, _GUARD), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for name in sorted(os.listdir(lock_dir)):
            match = _RANGE_FILE.fullmatch(name)
            if match is None:
                continue
            other_first, other_last = int(match[1]), int(match[2])
            if other_first > last or other_last < first:
                continue
            path = os.path.join(lock_dir, name)
            if _held_by_live_daemon(path):
                raise UidRangeInUse(
                    f"[jail] uid_min..uid_max = {first}..{last} overlaps uids"
                    f" {other_first}..{other_last}, in use by another sandboxd"
                    f" ({_holder(path)}, lock {path}); give each daemon a range of its own"
                )
        path = os.path.join(lock_dir, f"{first}-{last}.lock")
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
        )
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        return UidClaim(path, fd)
    finally:
        os.close(guard)  # closing drops the guard's flock
