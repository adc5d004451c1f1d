"""Namespaces: the zygote's own (mount, network) and each worker's (mount, pid, ipc, uts)."""

from __future__ import annotations

from sandboxd.jail import libc

# A worker's keeper unshares these before forking the worker (pid 1 of the new pid ns).
WORKER_NAMESPACES = libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS


def isolate_zygote() -> None:
    """Give the zygote a private mount namespace (for the root templates) and move it into
    one fresh, empty network namespace that every worker inherits.

    Creating a network namespace per worker is slow (teardown is asynchronous and
    serialised in the kernel), so the workers share this one. Its loopback stays down:
    with no interface up, no worker can reach another over IP.
    """
    libc.unshare(libc.CLONE_NEWNS | libc.CLONE_NEWNET)
    libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE)


def isolate_worker() -> None:
    """Called by the keeper: its next child is pid 1 of a new pid namespace."""
    libc.unshare(WORKER_NAMESPACES)
