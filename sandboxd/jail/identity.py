"""Identity: a uid/gid from the pool per live worker (daemon side), and the drop (worker side)."""

from __future__ import annotations

import os

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
