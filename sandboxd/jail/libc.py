"""Thin ctypes wrappers for the system calls Python 3.11's os module lacks.

Each wrapper raises OSError with errno on failure, like the os module does.
Constants are the kernel's (include/uapi/linux/sched.h, mount.h, prctl.h).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal

_libc = ctypes.CDLL(None, use_errno=True)
# The same libc, called with the GIL held: clone() must not release it around the fork.
_libc_holding_gil = ctypes.PyDLL(None, use_errno=True)
_libc_holding_gil.syscall.restype = ctypes.c_long

# clone/unshare flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
CLONE_PIDFD = 0x00001000
CLONE_PARENT = 0x00008000
NAMESPACE_FLAGS = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWTIME
)

# mount flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# prctl options
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def _check(result: int) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)))


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)))


def mount(
    source: str, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        )
    )


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        )
    )


# pivot_root(2) has no glibc wrapper: called through syscall(2) by number.
_NR_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)


def pivot_root(new_root: str, put_old: str) -> None:
    if _NR_PIVOT_ROOT is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unsupported machine {os.uname().machine}")
    _check(_libc.syscall(ctypes.c_long(_NR_PIVOT_ROOT), new_root.encode(), put_old.encode()))


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))))


# clone(2) by number: glibc's wrapper wants a new stack; this one forks like fork(2).
_NR_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)


def clone(flags: int) -> tuple[int, int]:
    """fork(2) with clone flags (new namespaces, CLONE_PARENT), as os.fork() does it:
    Python's before/after-fork hooks run (locks reset, at-fork handlers such as
    random's reseed). Returns (pid, pidfd) in the parent (pidfd -1 without
    CLONE_PIDFD) and (0, -1) in the child. The caller must be single-threaded."""
    if _NR_CLONE is None:
        raise OSError(errno.ENOSYS, f"clone: unsupported machine {os.uname().machine}")
    pidfd = ctypes.c_int(-1)
    # x86_64 and arm64 both take (flags, stack, parent_tid, ...): no new stack, and
    # CLONE_PIDFD stores the pidfd at parent_tid; the rest is unused here.
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _libc_holding_gil.syscall(
        ctypes.c_long(_NR_CLONE),
        ctypes.c_ulong(flags | signal.SIGCHLD),
        ctypes.c_void_p(0),
        ctypes.byref(pidfd),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
    )
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0, -1
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid, pidfd.value
