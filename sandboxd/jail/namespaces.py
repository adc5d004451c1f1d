"""Namespaces: the zygote's own (mount, network) and each worker's (pid, ipc, uts, and
for a worker without network its own network namespace; its mount namespace is a
private copy of its root's prebuilt one, made by rootfs.enter)."""

from __future__ import annotations

from sandboxd.jail import libc

# The zygote clones each worker into these (pid 1 of the new pid ns). Not CLONE_NEWNS:
# a copy of the zygote's namespace (every root template and the host's root) would
# only be detached again; the worker unshares a copy of its root's prebuilt one.
WORKER_NAMESPACES = libc.CLONE_NEWPID | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS


def isolate_zygote() -> None:
    """Give the zygote a private mount namespace (for the root templates) and move it into
    a fresh, empty network namespace, so that no process it forks is ever in the host's.
    """
    libc.unshare(libc.CLONE_NEWNS | libc.CLONE_NEWNET)
    libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE)


def worker_namespaces(network: bool) -> int:
    """The clone() namespace flags of a worker.

    A worker without network gets a network namespace of its own, with its loopback
    down: abstract Unix socket names, IP ports and loopback are per network namespace,
    so no other run can reach, be reached by, or see a port taken by this one. A
    network worker joins the shared egress namespace instead, where the egress
    nft rules and the network seccomp policy close those channels.
    """
    return WORKER_NAMESPACES if network else WORKER_NAMESPACES | libc.CLONE_NEWNET
