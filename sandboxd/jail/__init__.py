"""The jail: how a worker is isolated before it reads any code.

Theory of operation
-------------------
Processes (all forked, none exec'd except node):

  daemon (trio, root) ── control socket ──▶ zygote (root, warm interpreter)
      zygote: own mount namespace holding the read-only root templates
      (rootfs.py), and per root a prebuilt mount namespace pivoted into it (old
      root detached), held by an nsfs fd; an empty network namespace
      (namespaces.py); seccomp programs compiled once (seccomp.py). It never
      holds a client or listening socket: it is spawned with only its control socket.
  zygote ──clone──▶ template (root, runtimes/template.py), one per runtime whose warm
      modules are imported apart (the data-science one: [python3] warm_modules);
      the same otherwise; clones that runtime's workers
  zygote or template ──clone──▶ worker (pid 1 of its own pid namespace)
      clone(CLONE_PARENT, libc.clone) makes the worker (and the template) a
      child of the daemon, which waits for it itself (wait4 on its pidfd) and
      kills it through that pidfd: no process stands between them, and a
      zygote that dies leaves the runs in flight alone. New pid, ipc, uts
      namespaces, and net for a worker without network (its own); a worker
      with network joins the egress namespace instead (network.py).
      The zygote moves it into its cgroups (cgroup.py, scope.py), then lets it
      go. The worker enters the jail in this order, failing closed at any step:
      setns into its root's prebuilt mount namespace, every prebuilt
      namespace's fd closed, unshare a private copy, private tmpfs /tmp;
      fds 0/1/2 = job/stdout/stderr pipes, 3 = readiness pipe, rest closed;
      hostname; setsid; rlimits (config maxima);
      identity (bounding set cleared, no groups, uid/gid from the pool);
      no_new_privs, not dumpable, parent-death signal (the daemon's main
      thread); seccomp; "ready".
      Then it reads one job from fd 0, lowers its rlimits to the job's, runs
      the code and exits. When it exits the kernel kills the rest of its pid
      namespace, so nothing outlives a run.

Fds the daemon holds per worker: the write end of the job pipe, the read
ends of stdout and stderr, the read end of the readiness pipe (until
"ready"), and a pidfd (exit, kill). Nothing in a result is the worker's word
except the bytes it printed.
"""

from __future__ import annotations

import msgspec


class RootEntry(msgspec.Struct, frozen=True):
    """One host path made visible read-only in a jail root (at the same path by default)."""

    path: str
    # "dir" or "file": what to create as the mount point.
    kind: str
    # Where it appears in the jail, when not at `path`.
    target: str = ""


class RuntimeJail(msgspec.Struct, frozen=True):
    """What the zygote and a worker need of one runtime, as data: built in the daemon
    from the runtime's record (sandboxd/runtimes/), so the zygote imports no registry."""

    # Module under sandboxd.runtimes whose prepare() and start() run one job in the jail.
    runner: str
    # Its seccomp policy (jail/seccomp.py POLICIES) and the calls the admin added to it.
    seccomp_policy: str
    # Host paths bound read-only into its root.
    entries: list[RootEntry]
    extra_syscalls: list[str] = []
    # The runtime whose root template its workers share ("" or its own name: its own).
    root: str = ""
    # Host directory of its dependency environment, bound into the root (None: none).
    environment: str | None = None
    # Directories on sys.path of a python worker, as seen inside the jail.
    path: list[str] = []
    # Debian's packaged modules bound into the root (debianpy): their top-level paths
    # in dist-packages, the only things of that sys.path directory a run sees.
    packaged: list[str] = []
    # The program its worker execs (node), and the bootstrap it loads, inside the jail.
    executable: str = ""
    bootstrap: str = ""
    # Modules imported before its workers are forked: by the zygote itself, or with
    # `template`, by a template of its own (a child of the zygote, runtimes/template.py).
    warm_modules: list[str] = []
    template: bool = False


class JailSpec(msgspec.Struct, frozen=True):
    """Everything the zygote needs to build workers; derived once from the config."""

    runtime_dir: str
    hostname: str
    tmp_size_mb: int
    # rlimits set while the worker is prepared (the config's maxima).
    max_memory_mb: int
    max_cpu_seconds: int
    tasks: int
    file_size_mb: int
    open_files: int
    # Runtime name -> what its root holds and how its workers run (registry order).
    runtimes: dict[str, RuntimeJail]
    # Network namespace (a /run/netns path) of runs with egress, None unless mode "allow".
    egress_netns: str | None = None
    # Environment variables of runs with network: the proxy ([network] proxy), else none.
    proxy_env: dict[str, str] = msgspec.field(default_factory=dict)

    def root_name(self, runtime: str) -> str:
        """The root template a runtime's workers live in (jail/contain.root_of)."""
        return self.runtimes[runtime].root or runtime
