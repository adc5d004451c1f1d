"""The jail: how a worker is isolated before it reads any code.

Theory of operation
-------------------
Processes (all forked, none exec'd except node):

  daemon (trio, root) ── control socket ──▶ zygote (root, warm interpreter)
      zygote: own mount namespace holding the read-only root templates
      (rootfs.py) and an empty network namespace (namespaces.py);
      seccomp programs compiled once (seccomp.py). It never holds a client
      or listening socket: it is spawned with only its control socket.
  zygote ──clone──▶ data-science template (root, runtimes/template.py): the
      same, with [python3] warm_modules imported; clones the data-science
      pools' workers
  zygote or template ──clone──▶ worker (pid 1 of its own pid namespace)
      clone(CLONE_PARENT, libc.clone) makes the worker (and the template) a
      child of the daemon, which waits for it itself (wait4 on its pidfd) and
      kills it through that pidfd: no process stands between them, and a
      zygote that dies leaves the runs in flight alone. New mount, pid, ipc,
      uts namespaces, and net for a worker without network (its own); a
      worker with network joins the egress namespace instead (network.py).
      The zygote moves it into its cgroups (cgroup.py, scope.py), then lets it
      go. The worker enters the jail in this order, failing closed at any step:
      fds 0/1/2 = job/stdout/stderr pipes, 3 = readiness pipe, rest closed;
      private tmpfs /tmp; pivot_root into the root, old root detached;
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
    # language -> host paths bound into that language's root.
    roots: dict[str, list[RootEntry]]
    # Directories on sys.path of a python worker, as seen inside the jail.
    python_path: list[str]
    # Host directory of the jail's python packages (None when none are installed).
    python_site_packages: str | None
    node_path: str
    node_bootstrap: str
    # Network namespace (a /run/netns path) of runs with egress, None unless mode "allow".
    egress_netns: str | None = None
    # Debian's packaged modules bound into the python root (debianpy): their top-level
    # paths in dist-packages, the only things of that sys.path directory a run sees.
    python_packaged: list[str] = msgspec.field(default_factory=list)
    # Environment variables of runs with network: the proxy ([network] proxy), else none.
    proxy_env: dict[str, str] = msgspec.field(default_factory=dict)
    # language -> system calls the admin added to its seccomp allow-list (extra_syscalls).
    extra_syscalls: dict[str, list[str]] = msgspec.field(default_factory=dict)
    # Modules of the jail's environment the zygote imports before forking ([python3]).
    python_warm_modules: list[str] = []
