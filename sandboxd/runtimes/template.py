"""A template: a child of the zygote with a runtime's warm modules imported (the
data-science runtime's: [python3] warm_modules), which forks that runtime's workers.

The zygote stays plain (the stdlib only): a 100 MB template makes every fork and
every worker exit slower, which plain runs should not pay. The template is forked
from the zygote after its preparation, so it holds the zygote's root templates
(among them its runtime's own: for data science, the python3 root plus Debian's
numpy, pandas and matplotlib), the fd of that root's prebuilt mount namespace
(jail/rootfs.py prebuild; it closes the other roots') and seccomp programs. In a
mount namespace of its own it imports the modules chrooted into its runtime's
root, so they are loaded from where a worker finds them (the synced environment
first, then Debian's), runs the WARM_UP table, and then serves spawn orders that
the zygote relays to it over a seqpacket socket, answering with the worker's fds
the zygote passes on.

Trust: the admin chose these packages, so their import-time code runs as root in
the template before any user code, like the zygote's own. No caller-supplied code
runs before isolation (invariant 2). BLAS and OpenMP are pinned to one thread so
the template stays single-threaded and every fork is safe; each run is a fresh
fork, so rcParams, pandas options and numpy's error state a run changes die with it.
"""

from __future__ import annotations

import array
import gc
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, NoReturn

from sandboxd import control, runtimes
from sandboxd.control import SpawnFailed
from sandboxd.jail import contain, libc
from sandboxd.runtimes.datascience import ENVIRONMENT

if TYPE_CHECKING:
    from sandboxd.zygote import Zygote

# The template's process name (/proc/PID/comm); its zygote keeps the interpreter's.
COMM = "sandboxd-tmpl"

# Run in the zygote right after a warm module is imported, so that what the library
# does lazily on first use (matplotlib's first draw and font loading, pandas'
# groupby and CSV machinery) is done once instead of in every run. Ours, trusted like
# the modules. matplotlib's font cache is emptied afterwards: its fonts hold open
# files, and a worker keeps no fd of the zygote's.
WARM_UP = {
    "numpy": "import numpy\n(numpy.arange(4.0) @ numpy.ones(4)).item()\n",
    "pandas": (
        "import io, pandas\n"
        "frame = pandas.read_csv(io.StringIO('a,b\\n1,2\\n1,3\\n'))\n"
        "frame.groupby('a')['b'].sum().to_json()\n"
        "repr(frame)\n"
    ),
    "matplotlib.pyplot": (
        "import io, matplotlib.pyplot, matplotlib.font_manager\n"
        "matplotlib.pyplot.plot([1, 2], [2, 1])\n"
        "matplotlib.pyplot.title('warm')\n"
        "matplotlib.pyplot.savefig(io.BytesIO(), format='png')\n"
        "matplotlib.pyplot.close('all')\n"
        "matplotlib.font_manager._get_font.cache_clear()\n"
    ),
}

# State a warm module drew once from the OS and every fork of the template would
# otherwise share: run in each worker right after its fork, when the module is warm.
# numpy's global generator (numpy.random.random and friends) would give every run
# the same numbers; Python's random reseeds itself at fork.
RESEED_AFTER_FORK = {
    "numpy": "import numpy\nnumpy.random.seed()\n",
}


def reseed_after_fork() -> None:
    """Register RESEED_AFTER_FORK for the warm modules (in the template, before it forks)."""
    for module, code in RESEED_AFTER_FORK.items():
        if module in sys.modules:
            os.register_at_fork(after_in_child=lambda code=code: exec(code, {}))


def prepare(zygote: Zygote, name: str) -> list[str]:
    """In a mount namespace of the template's own, import the warm modules of runtime
    `name` chrooted into its root (built by the zygote), so they are loaded from where
    a worker finds them (the synced environment first, then Debian's); problems as
    lines."""
    runtime = zygote.spec.runtimes[name]
    if not runtime.warm_modules:
        return []
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE)
    root = contain.root_of(zygote.spec, zygote.spec.root_name(name))
    return warm(root, runtime.path, runtime.warm_modules)


def warm(root: str, python_path: list[str], modules: list[str]) -> list[str]:
    """Import `modules` chrooted into the jail root `root`, with the jail's sys.path
    and environment and a scratch tmpfs on its /tmp (matplotlib's caches), then come
    back out; one line per module that failed to import (modules that are not
    installed are skipped silently) or per thread or fd they left behind."""
    saved_path = sys.path[:]
    saved_env = dict(os.environ)
    fds = set(os.listdir("/proc/self/fd"))
    libc.mount("sandboxd-warm", root + "/tmp", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0700")
    outside = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    os.environ.update(ENVIRONMENT)
    sys.path[:] = python_path
    sys.path_importer_cache.clear()
    try:
        os.chroot(root)
        os.chdir("/tmp")
        problems = _import(modules)
    finally:
        # Back to the zygote's root: root may leave a chroot through a directory fd.
        os.fchdir(outside)
        os.chroot(".")
        os.fchdir(here)
        os.close(outside)
        os.close(here)
        libc.umount2(root + "/tmp", libc.MNT_DETACH)
        sys.path[:] = saved_path
        sys.path_importer_cache.clear()
        os.environ.clear()
        os.environ.update(saved_env)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        problems.append(f"the warm modules left {threads} threads in the zygote")
    left_open = set(os.listdir("/proc/self/fd")) - fds
    if left_open:
        problems.append(f"the warm modules left fds {sorted(left_open)} open in the zygote")
    return problems


def _import(modules: list[str]) -> list[str]:
    problems: list[str] = []
    for name in modules:
        try:
            __import__(name)
            exec(WARM_UP.get(name, ""), {})
        except ModuleNotFoundError as exc:
            if exc.name is None or name.split(".")[0] != exc.name.split(".")[0]:
                problems.append(f"{name}: {exc}")
        except Exception as exc:
            problems.append(f"{name}: {exc!r}")
    return problems


def start(zygote: Zygote, name: str) -> socket.socket:
    """Fork the template of runtime `name`; the zygote's end of its socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # A child of the daemon, like the workers it clones (zygote.py): the daemon reaps it.
    pid, pidfd = libc.clone(libc.CLONE_PARENT | libc.CLONE_PIDFD)
    if pid == 0:
        ours.close()
        _serve(zygote, name, theirs)
    zygote.template_pidfds.append(pidfd)
    theirs.close()
    return ours


def _serve(zygote: Zygote, name: str, sock: socket.socket) -> NoReturn:
    try:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        # Told apart from its zygote by name: both are the daemon's children (start()).
        with open("/proc/self/comm", "w") as comm:
            comm.write(COMM)
        zygote.sock.close()
        zygote.sock = sock
        for other in zygote.templates.values():  # the templates forked before this one
            other.close()
        for pidfd in zygote.template_pidfds:
            os.close(pidfd)
        zygote.templates, zygote.template_pidfds = {}, []
        # Its workers enter only its root's prebuilt mount namespace: the others' go.
        own = zygote.spec.root_name(name)
        for root, fd in zygote.mount_namespaces.items():
            if root != own:
                os.close(fd)
        zygote.mount_namespaces = {own: zygote.mount_namespaces[own]}
        for problem in prepare(zygote, name):
            print(f"sandboxd template: warm modules: {problem}", file=sys.stderr)
        reseed_after_fork()
        runtime = zygote.spec.runtimes[name]
        runtimes.get(runtime.runner).before_forks(zygote.spec, runtime)
        gc.freeze()
        zygote.serve()
    except BaseException as exc:
        print(f"sandboxd template: {exc!r}", file=sys.stderr)
    os._exit(1)


def relay(template: socket.socket, packet: bytes, daemon: socket.socket, worker_id: int) -> bool:
    """Pass one spawn order to the template and its answer (with fds) to the daemon;
    False (after answering SpawnFailed) when the template is gone."""
    fds: list[int] = []
    try:
        template.send(packet)
        reply, ancdata, _, _ = template.recvmsg(
            control.MAX_PACKET, socket.CMSG_SPACE(4 * control.SPAWNED_FDS), socket.MSG_CMSG_CLOEXEC
        )
    except OSError:
        reply, ancdata = b"", []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(memoryview(data).cast("i"))
    try:
        if not reply:
            failed = SpawnFailed(worker_id, "the runtime's template is gone")
            daemon.send(control.encoder.encode(failed))
            return False
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        daemon.sendmsg([reply], rights)
        return True
    finally:
        for fd in fds:
            os.close(fd)
