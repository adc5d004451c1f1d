"""The zygote: a warm, root, single-threaded process that forks jailed workers.

Started by the daemon (command()) as `python -I -S`: no site module, so nothing of the
daemon's venv (.pth hooks, site-packages) is imported or on sys.path beyond the roots
of BOOTSTRAP_PACKAGES, and each worker drops those before user code runs
(runtimes/python3.py). It gets exactly one fd besides 0-2: a SOCK_SEQPACKET control
socket, whose number is the only argument. The first packet is ZygoteStart with
the JailSpec; then each SpawnOrder gets a Spawned (with the worker's fds) or a SpawnFailed. See
sandboxd/jail/__init__.py for the process tree.
"""

from __future__ import annotations

import array
import gc
import importlib.util
import os
import select
import signal
import site
import socket
import sys
from typing import NoReturn

import msgspec

from sandboxd import control, runtimes
from sandboxd.control import Exited, Ready, Spawned, SpawnFailed, SpawnOrder, ZygoteStart
from sandboxd.jail import (
    JailSpec,
    contain,
    libc,
    namespaces,
    network,
    rootfs,
    seccomp,
)
from sandboxd.runtimes import template

# Modules imported once here so that every worker starts with them warm.
WARM_MODULES = (
    "json",
    "base64",
    "re",
    "datetime",
    "collections",
    "itertools",
    "functools",
    "math",
    "random",
    "string",
    "time",
    "typing",
    "decimal",
    "hashlib",
    "uuid",
    "traceback",
    "linecache",
    "threading",
    "textwrap",
    "dataclasses",
    "enum",
    "statistics",
    "copy",
    "urllib.parse",
    "zoneinfo",
    "logging",
    "io",
    "struct",
    "operator",
    "heapq",
    "bisect",
    "fractions",
    "csv",
    "pprint",
    "html",
    "secrets",
    "unicodedata",
    "encodings.idna",
)


# What the zygote imports beyond the standard library; it finds them on their roots alone.
BOOTSTRAP_PACKAGES = ("sandboxd", "msgspec", "seccomp")


def import_roots() -> list[str]:
    """The directories BOOTSTRAP_PACKAGES are imported from, as the daemon found them."""
    roots: list[str] = []
    for name in BOOTSTRAP_PACKAGES:
        found = importlib.util.find_spec(name)
        if found is None or found.origin is None:
            raise RuntimeError(f"the zygote needs {name!r}, which is not installed")
        root = os.path.dirname(
            os.path.dirname(found.origin) if found.submodule_search_locations else found.origin
        )
        if root not in roots:
            roots.append(root)
    return roots


def command(control_fd: int) -> list[str]:
    """The zygote's argv: this interpreter, isolated (-I) and without site (-S)."""
    boot = f"import sys; sys.path[:0] = {import_roots()!r}; import sandboxd.zygote as z; z.main()"
    return [sys.executable, "-I", "-S", "-c", boot, str(control_fd)]


class Zygote:
    def __init__(self, sock: socket.socket, spec: JailSpec) -> None:
        self.sock = sock
        self.spec = spec
        # One program per language for runs without network and one for runs with it.
        self.programs = {
            (language, network): seccomp.compile_policy(
                language, spec.extra_syscalls.get(language, ()), network
            )
            for language in spec.roots
            for network in (False, True)
        }
        self.egress_fd: int | None = None
        # The data-science template's socket (None: there is none, or this is it).
        self.template: socket.socket | None = None

    def prepare(self) -> None:
        # Opened before the zygote leaves the host's network namespace.
        self.egress_fd = (
            os.open(self.spec.egress_netns, os.O_RDONLY) if self.spec.egress_netns else None
        )
        namespaces.isolate_zygote()
        for language, entries in self.spec.roots.items():
            rootfs.build(contain.root_of(self.spec, language), entries, self.root_files(language))
        for name in WARM_MODULES:
            __import__(name)
        # -S skipped site and the builtins it adds (exit, quit, help, copyright, credits,
        # license), which snippets use; add those alone (site's path handling stays off).
        site.setquit()
        site.setcopyright()
        site.sethelper()
        # Keepers are reaped by the kernel; each keeper resets this for its own child.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        # Move every object the zygote made out of the collector's reach, so a worker's
        # garbage collections do not touch (and copy-on-write) the whole warm heap.
        gc.freeze()
        self.template = template.start(self)

    def root_files(self, language: str) -> dict[str, bytes]:
        """The files written into a language's root (besides rootfs.ETC_FILES)."""
        files = {"/etc/hostname": self.spec.hostname.encode() + b"\n"}
        files.update(runtimes.get(language).root_files(self.spec))
        if self.spec.egress_netns is not None:
            # The host's resolver may be on its loopback, unreachable from the jail.
            files["/etc/resolv.conf"] = network.resolv_conf()
        return files

    def serve(self) -> NoReturn:
        while True:
            try:
                packet = self.sock.recv(control.MAX_PACKET)
            except OSError:
                packet = b""
            if not packet:
                os._exit(0)  # the daemon is gone or done with this generation
            order = control.order_decoder.decode(packet)
            if isinstance(order, SpawnOrder):
                if order.profile and self.template is not None:
                    if not template.relay(self.template, packet, self.sock, order.worker_id):
                        self.template = None  # gone: later orders are served plain
                else:
                    self.spawn(order)

    def spawn(self, order: SpawnOrder) -> None:
        job_r, job_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (job_r, job_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            ours.close()
            theirs.close()
            self.sock.send(control.encoder.encode(SpawnFailed(order.worker_id, str(exc))))
            return
        if pid == 0:
            self.sock.close()
            if self.template is not None:
                self.template.close()
            ours.close()
            for fd in (job_w, out_r, err_r):
                os.close(fd)
            Keeper(self, order, theirs, (job_r, out_w, err_w)).run()
        for fd in (job_r, out_w, err_w):
            os.close(fd)
        theirs.close()
        fds = array.array("i", [job_w, out_r, err_r, ours.fileno()])
        reply = control.encoder.encode(Spawned(order.worker_id))
        self.sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        for fd in (job_w, out_r, err_r):
            os.close(fd)
        ours.close()


class Keeper:
    """Root, trusted: forks the worker into new namespaces, waits for it, reports."""

    def __init__(
        self, zygote: Zygote, order: SpawnOrder, sock: socket.socket, stdio: tuple[int, int, int]
    ) -> None:
        self.zygote = zygote
        self.order = order
        self.sock = sock
        self.stdio = stdio

    def run(self) -> NoReturn:
        try:
            self._run()
        except BaseException as exc:
            print(f"sandboxd keeper: {exc!r}", file=sys.stderr)
        os._exit(0)

    def _send(self, message: Ready | Exited) -> None:
        try:
            self.sock.send(control.encoder.encode(message))
        except OSError:
            pass  # the daemon went away; the worker is killed below or already dead

    def _run(self) -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # No parent-death signal: a keeper outlives a zygote that crashed, so the run on
        # its worker finishes and its exit report frees the uid and cgroup. It answers to
        # the daemon alone: when the daemon goes, its socket hangs up and it kills the worker.
        if self.order.network:
            if self.zygote.egress_fd is None:
                raise RuntimeError("a network worker was ordered but there is no egress namespace")
            libc.setns(self.zygote.egress_fd, libc.CLONE_NEWNET)
        namespaces.isolate_worker(self.order.network)
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.close(ready_r)
            _enter_jail(self.zygote, self.order, self.stdio, go_r, ready_w)
        os.close(go_r)
        os.close(ready_w)
        for fd in self.stdio:
            os.close(fd)
        setup_error = ""
        try:
            for path in self.order.cgroup_procs:
                with open(path, "w") as procs:
                    procs.write(str(pid))
            os.write(go_w, b"g")
        except OSError as exc:
            setup_error = f"cgroup: {exc}"
            os.kill(pid, signal.SIGKILL)
        os.close(go_w)
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(ready_r, select.POLLIN)
        poller.register(self.sock, select.POLLIN)
        ready = False
        report_pending = True
        while True:
            for fd, events in poller.poll():
                if fd == ready_r or (fd == pidfd and report_pending):
                    # A worker that died while preparing still left its reason in the
                    # pipe (its write end is closed now, so this read cannot block).
                    message = os.read(ready_r, 4096)
                    poller.unregister(ready_r)
                    report_pending = False
                    if message == b"ok":
                        ready = True
                        self._send(Ready(pid))
                    else:
                        setup_error = message.decode(errors="replace")
                if fd == pidfd:
                    _, status, usage = os.wait4(pid, 0)
                    if not ready and not setup_error:
                        setup_error = f"worker {describe_status(status)} before it was ready"
                    self._send(
                        Exited(status, usage.ru_utime, usage.ru_stime, usage.ru_maxrss, setup_error)
                    )
                    return
                if fd == self.sock.fileno():
                    request = self.sock.recv(16) if events & select.POLLIN else b""
                    if request != control.KILL:
                        poller.unregister(self.sock)  # hang-up: the daemon is gone
                    os.kill(pid, signal.SIGKILL)


def describe_status(status: int) -> str:
    """A wait status in words, naming a seccomp kill (e.g. a runtime's start-up needs)."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            return f"was killed by signal {signum} ({signal.Signals(signum).name})"
        except ValueError:
            return f"was killed by signal {signum}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _enter_jail(
    zygote: Zygote, order: SpawnOrder, stdio: tuple[int, int, int], go_r: int, ready_w: int
) -> NoReturn:
    """Pid 1 of the new namespaces: jail itself (jail/contain.py), run one job."""
    # Only runs with network get the proxy's variables.
    spec = zygote.spec if order.network else msgspec.structs.replace(zygote.spec, proxy_env={})
    runtime = runtimes.get(order.language)
    contain.contain(
        spec,
        contain.root_of(spec, order.language),
        order.uid,
        zygote.programs[order.language, order.network],
        runtime.prepare,
        runtime.start,
        stdio,
        go_r,
        ready_w,
    )


def main() -> NoReturn:
    sock = socket.socket(fileno=int(sys.argv[1]))
    packet = sock.recv(control.MAX_PACKET)
    start = control.order_decoder.decode(packet)
    if not isinstance(start, ZygoteStart):
        raise SystemExit("sandboxd zygote: expected a start message")
    # The daemon runs at a higher priority (daemon.DAEMON_NICE); workers run at the default.
    os.setpriority(os.PRIO_PROCESS, 0, 0)
    zygote = Zygote(sock, start.spec)
    zygote.prepare()
    sock.send(b"ready")
    zygote.serve()


if __name__ == "__main__":
    main()
