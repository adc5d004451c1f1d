"""The jailed worker's entry: its isolation steps, in order, as one readable sequence.

contain() runs in the worker (pid 1 of its new namespaces, cloned by the zygote)
and fails closed: the first step that raises is named on the readiness pipe and
the worker exits with SETUP_FAILED_EXIT before it reads any code. The order is
the one jail/__init__.py draws; each step's details live in its own module.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Collection
from typing import NoReturn

from sandboxd.jail import JailSpec, identity, libc, rlimits, rootfs, seccomp

# Readiness pipe of the worker while it prepares; closed before user code runs.
READY_FD = 3
SETUP_FAILED_EXIT = 111


def root_of(spec: JailSpec, language: str) -> str:
    """Where the zygote builds a language's read-only root template (prebuilt into a
    mount namespace of its own, rootfs.prebuild, which is what workers enter)."""
    return os.path.join(spec.runtime_dir, f"root-{language}")


def contain(
    spec: JailSpec,
    namespace: int,
    prebuilt: Collection[int],
    uid: int,
    program: bytes,
    prepare: Callable[[JailSpec], None],
    start: Callable[[JailSpec, int], NoReturn],
    stdio: tuple[int, int, int],
    go_r: int,
    ready_w: int,
) -> NoReturn:
    """Jail this process, then hand over to its runtime (prepare, then start, which
    reports ready on READY_FD and runs one job). `namespace` is the nsfs fd of its
    root's prebuilt mount namespace, `prebuilt` every such fd it holds. Never returns."""
    report_fd = ready_w
    step = "start"
    try:
        # Until the zygote has put us into our cgroups; end-of-file: it died first.
        if os.read(go_r, 1) != b"g":
            raise RuntimeError("not placed in its cgroups (the zygote is gone)")
        # First, so that the prebuilt namespaces' fds are closed by name before the
        # fds step; its closerange is a second line, not the only one.
        step = "filesystem"
        rootfs.enter(namespace, prebuilt, spec.tmp_size_mb, uid)
        step = "fds"
        for target, fd in enumerate((*stdio, ready_w)):
            os.dup2(fd, target, inheritable=target < READY_FD)
        report_fd = READY_FD
        os.closerange(READY_FD + 1, 1 << 20)
        step = "hostname"
        libc.sethostname(spec.hostname)
        step = "session"
        os.setsid()
        step = "rlimits"
        rlimits.apply(spec)
        step = "identity"
        identity.drop(uid)
        # The parent is the daemon's main thread (CLONE_PARENT): no run outlives it.
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        step = "runtime"
        prepare(spec)
        step = "seccomp"
        seccomp.load(program)
        step = "start"
        start(spec, READY_FD)
    except BaseException as exc:
        try:
            os.write(report_fd, f"{step}: {exc}".encode())
        finally:
            os._exit(SETUP_FAILED_EXIT)
