"""The data-science template: a child of the zygote with [python3] warm_modules
imported, which forks the workers of the data-science pools (profiles.py).

The zygote stays plain (the stdlib only): a 100 MB template makes every fork and
every worker exit slower, which plain runs should not pay. The template is forked
from the zygote after its preparation, so it shares the zygote's mount namespace,
root templates and seccomp programs; it imports the modules from the jail's own
environment (never the daemon's venv), exposed at the path the jail sees it, runs
the WARM_UP table, and then serves spawn orders that the zygote relays to it over
a seqpacket socket, answering with the worker's fds the zygote passes on.

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
import shutil
import signal
import socket
import sys
import tempfile
from typing import TYPE_CHECKING, NoReturn

from sandboxd import control
from sandboxd.control import SpawnFailed
from sandboxd.jail import JailSpec, libc
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


def prepare(spec: JailSpec, scratch: str) -> list[str]:
    """Expose the jail's environment, then import the warm modules; problems as lines."""
    site = spec.python_site_packages
    targets = [e.target for e in spec.roots.get("python3", []) if e.path == site and e.target]
    if site is None or not targets or not spec.python_warm_modules:
        return []
    try:
        expose(site, targets[0], scratch)
    except OSError as exc:
        return [f"environment not exposed in the zygote, nothing warmed: {exc}"]
    return warm(spec.python_path, spec.python_warm_modules)


def expose(source: str, target: str, scratch: str) -> None:
    """In the zygote's own mount namespace, show host directory `source` at `target`,
    the path where the jail sees it, so warm modules carry the jail's paths (__file__,
    matplotlib's data and font paths). A missing target is made in an overlay on its
    nearest existing ancestor, upper layer on a tmpfs at `scratch`: the host's
    filesystem is not written."""
    if not os.path.isdir(target):
        anchor = os.path.dirname(target)
        while not os.path.isdir(anchor):
            anchor = os.path.dirname(anchor)
        if anchor == "/":
            raise OSError(f"no directory to lay an overlay on for {target}")
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        libc.mount("tmpfs", scratch, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0700")
        for layer in ("upper", "work"):
            os.mkdir(os.path.join(scratch, layer))
        options = f"lowerdir={anchor},upperdir={scratch}/upper,workdir={scratch}/work"
        libc.mount("overlay", anchor, "overlay", 0, options)
        os.makedirs(target)
    libc.mount(source, target, None, libc.MS_BIND | libc.MS_REC)


def warm(python_path: list[str], modules: list[str]) -> list[str]:
    """Import `modules` in the zygote with the jail's sys.path only (expose() put the
    environment at its jail path); returns one line per module that failed to import
    (modules that are not installed are skipped silently)."""
    if not modules:
        return []
    saved_path = sys.path[:]
    saved_env = dict(os.environ)
    cache = tempfile.mkdtemp(prefix="sandboxd-warm-")
    os.environ.update(ENVIRONMENT)
    os.environ["MPLCONFIGDIR"] = cache
    sys.path[:] = python_path
    sys.path_importer_cache.clear()
    problems: list[str] = []
    fds = set(os.listdir("/proc/self/fd"))
    try:
        for name in modules:
            try:
                __import__(name)
                exec(WARM_UP.get(name, ""), {})
            except ModuleNotFoundError as exc:
                if exc.name is None or name.split(".")[0] != exc.name.split(".")[0]:
                    problems.append(f"{name}: {exc}")
            except Exception as exc:
                problems.append(f"{name}: {exc!r}")
    finally:
        sys.path[:] = saved_path
        sys.path_importer_cache.clear()
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(cache, ignore_errors=True)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        problems.append(f"the warm modules left {threads} threads in the zygote")
    left_open = set(os.listdir("/proc/self/fd")) - fds
    if left_open:
        problems.append(f"the warm modules left fds {sorted(left_open)} open in the zygote")
    return problems


def start(zygote: Zygote) -> socket.socket | None:
    """Fork the template when there is something to warm; the zygote's end of its socket."""
    spec = zygote.spec
    if not spec.python_warm_modules or spec.python_site_packages is None:
        return None
    if "python3" not in spec.roots:
        return None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # A child of the daemon, like the workers it clones (zygote.py): the daemon reaps it.
    pid, zygote.template_pidfd = libc.clone(libc.CLONE_PARENT | libc.CLONE_PIDFD)
    if pid == 0:
        ours.close()
        _serve(zygote, theirs)
    theirs.close()
    return ours


def _serve(zygote: Zygote, sock: socket.socket) -> NoReturn:
    try:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        # Told apart from its zygote by name: both are the daemon's children (start()).
        with open("/proc/self/comm", "w") as comm:
            comm.write(COMM)
        zygote.sock.close()
        zygote.sock = sock
        scratch = os.path.join(zygote.spec.runtime_dir, "warm-overlay")
        for problem in prepare(zygote.spec, scratch):
            print(f"sandboxd template: warm modules: {problem}", file=sys.stderr)
        reseed_after_fork()
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
            control.MAX_PACKET, socket.CMSG_SPACE(4 * control.SPAWNED_FDS)
        )
    except OSError:
        reply, ancdata = b"", []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(memoryview(data).cast("i"))
    try:
        if not reply:
            failed = SpawnFailed(worker_id, "the data-science template is gone")
            daemon.send(control.encoder.encode(failed))
            return False
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        daemon.sendmsg([reply], rights)
        return True
    finally:
        for fd in fds:
            os.close(fd)
