"""The zygote: a warm, root, single-threaded process that forks jailed workers.

Started by the daemon (command()) as `python -I -S`: no site module, so nothing of the
daemon's venv (.pth hooks, site-packages) is imported or on sys.path beyond the roots
of BOOTSTRAP_PACKAGES, and each worker drops those before user code runs
(runtimes/python3.py). It gets exactly one fd besides 0-2: a SOCK_SEQPACKET control
socket, whose number is the only argument. The first packet is ZygoteStart with
the JailSpec, answered by "ready" (with a pidfd of each template, if any: like the
workers they are children of the daemon); then each SpawnOrder gets a Spawned (with
the worker's fds) or a SpawnFailed. See sandboxd/jail/__init__.py for the process
tree. All it knows of a runtime is data in the JailSpec (JailSpec.runtimes: root
entries, warm modules, seccomp policy, the runner module), so it imports no registry
and no dependency machinery.
"""

from __future__ import annotations

import array
import gc
import importlib.util
import os
import signal
import site
import socket
import sys
from typing import NoReturn

import msgspec

from sandboxd import control, runtimes
from sandboxd.control import Spawned, SpawnFailed, SpawnOrder, ZygoteStart
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
        # One program per runtime for runs without network and one for runs with it
        # (runtimes with the same policy and extra calls share theirs).
        compiled: dict[tuple[str, tuple[str, ...], bool], bytes] = {}
        self.programs: dict[tuple[str, bool], bytes] = {}
        for name, runtime in spec.runtimes.items():
            for with_network in (False, True):
                key = (runtime.seccomp_policy, tuple(runtime.extra_syscalls), with_network)
                if key not in compiled:
                    compiled[key] = seccomp.compile_policy(*key)
                self.programs[name, with_network] = compiled[key]
        self.egress_fd: int | None = None
        # Runtime name -> its template's socket (none in a template itself).
        self.templates: dict[str, socket.socket] = {}
        # Pidfds of the templates, for the daemon (their parent).
        self.template_pidfds: list[int] = []
        # Root name -> nsfs fd of its prebuilt mount namespace (rootfs.prebuild), which
        # its workers enter.
        self.mount_namespaces: dict[str, int] = {}

    def prepare(self) -> None:
        # Opened before the zygote leaves the host's network namespace.
        self.egress_fd = (
            os.open(self.spec.egress_netns, os.O_RDONLY) if self.spec.egress_netns else None
        )
        namespaces.isolate_zygote()
        for name, runtime in self.spec.runtimes.items():
            if self.spec.root_name(name) != name:
                continue  # it shares another runtime's root
            files = {"/etc/hostname": self.spec.hostname.encode() + b"\n"}
            files.update(runtimes.get(runtime.runner).root_files(self.spec, runtime))
            if self.spec.egress_netns is not None:
                # The host's resolver may be on its loopback, unreachable from the jail.
                files["/etc/resolv.conf"] = network.resolv_conf()
            root = contain.root_of(self.spec, name)
            rootfs.build(root, runtime.entries, files)
            self.mount_namespaces[name] = rootfs.prebuild(root)
        for runtime in self.spec.runtimes.values():
            if not runtime.template:
                for module in runtime.warm_modules:
                    __import__(module)
        # -S skipped site and the builtins it adds (exit, quit, help, copyright, credits,
        # license), which snippets use; add those alone (site's path handling stays off).
        site.setquit()
        site.setcopyright()
        site.sethelper()
        # Each worker replaces sys.path and clears this cache (runtimes/python3.py):
        # emptied here, the finders and their directory listings are not freed (and
        # their pages copied on write) in every worker instead.
        sys.path_importer_cache.clear()
        for runtime in self.spec.runtimes.values():
            runtimes.get(runtime.runner).before_forks(self.spec, runtime)
        # Move every object the zygote made out of the collector's reach, so a worker's
        # garbage collections do not touch (and copy-on-write) the whole warm heap.
        gc.freeze()
        for name, runtime in self.spec.runtimes.items():
            if runtime.template and runtime.warm_modules:
                self.templates[name] = template.start(self, name)

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
                relay_to = self.templates.get(order.runtime)
                if relay_to is not None:
                    if not template.relay(relay_to, packet, self.sock, order.worker_id):
                        del self.templates[order.runtime]  # gone: later orders served plain
                else:
                    self.spawn(order)

    def spawn(self, order: SpawnOrder) -> None:
        """Clone the worker straight into its new namespaces, as pid 1 of its own pid
        namespace and a child of the daemon (CLONE_PARENT), which waits for it itself
        (worker.py): no process stands between them, and a zygote that dies leaves the
        runs in flight alone. Put it into its cgroups, then let it jail itself."""
        job_r, job_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        daemon_ends = [job_w, out_r, err_r, ready_r]
        worker_ends = (job_r, out_w, err_w)
        flags = libc.CLONE_PARENT | libc.CLONE_PIDFD | namespaces.worker_namespaces(order.network)
        try:
            pid, pidfd = libc.clone(flags)
        except OSError as exc:
            for fd in (*daemon_ends, *worker_ends, go_r, go_w, ready_w):
                os.close(fd)
            self.sock.send(control.encoder.encode(SpawnFailed(order.worker_id, str(exc))))
            return
        if pid == 0:
            try:
                # go_w first: a zygote that dies now hangs up the worker's go pipe.
                for fd in (go_w, *daemon_ends):
                    os.close(fd)
                _enter_jail(self, order, worker_ends, go_r, ready_w)
            finally:
                os._exit(contain.SETUP_FAILED_EXIT)
        for fd in (*worker_ends, go_r):
            os.close(fd)
        try:
            for path in order.cgroup_procs:
                with open(path, "w") as procs:
                    procs.write(str(pid))
            os.write(go_w, b"g")
        except OSError as exc:
            # Said on its readiness pipe, where the daemon looks for why it did not start.
            os.write(ready_w, f"cgroup: {exc}".encode())
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(go_w)
        os.close(ready_w)
        fds = array.array("i", [*daemon_ends, pidfd])
        reply = control.encoder.encode(Spawned(order.worker_id, pid))
        try:
            self.sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        finally:
            for fd in fds:
                os.close(fd)


def _enter_jail(
    zygote: Zygote, order: SpawnOrder, stdio: tuple[int, int, int], go_r: int, ready_w: int
) -> NoReturn:
    """Pid 1 of the new namespaces: jail itself (jail/contain.py), run one job."""
    try:
        if order.network:
            # Instead of a network namespace of its own (worker_namespaces left it out).
            if zygote.egress_fd is None:
                raise RuntimeError("a network worker was ordered but there is no egress namespace")
            libc.setns(zygote.egress_fd, libc.CLONE_NEWNET)
    except BaseException as exc:
        os.write(ready_w, f"network: {exc}".encode())
        os._exit(contain.SETUP_FAILED_EXIT)
    # Only runs with network get the proxy's variables.
    spec = zygote.spec if order.network else msgspec.structs.replace(zygote.spec, proxy_env={})
    runtime = spec.runtimes[order.runtime]
    runner = runtimes.get(runtime.runner)
    contain.contain(
        spec,
        zygote.mount_namespaces[spec.root_name(order.runtime)],
        list(zygote.mount_namespaces.values()),
        order.uid,
        zygote.programs[order.runtime, order.network],
        lambda spec: runner.prepare(spec, runtime),
        lambda spec, ready_fd: runner.start(spec, runtime, ready_fd),
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
    # The templates are the daemon's children (runtimes/template.py): their pidfds go there.
    pidfds = zygote.template_pidfds
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", pidfds))] if pidfds else []
    sock.sendmsg([b"ready"], rights)
    for fd in pidfds:
        os.close(fd)
    zygote.serve()


if __name__ == "__main__":
    main()
