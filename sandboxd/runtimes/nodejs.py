"""The nodejs runtime: the jailed worker execs node on a small bootstrap (bootstrap.js).

V8 is multi-threaded and cannot be forked once started, so every node worker is
a fresh node process: the worker finishes its jail in Python (seccomp included),
then execs node, which loads the bootstrap, reports ready on fd 3 and waits for
its one job on fd 0. Nothing of the host's environment is passed on.

Heap cap: the job's memory limit is only known after node has started, so the
V8 heap cap is derived from the spec's memory ceiling (the RLIMIT_DATA
backstop): 3/4 of it. With cgroups that ceiling is twice the config's
max_memory_mb, so the cap lies above every job's cgroup limit and a heap bomb
ends with the cgroup's OOM kill (the `memory` verdict); without cgroups the
ceiling is max_memory_mb itself, and the cap makes V8 stop with its own "heap
out of memory" abort before allocations fail on the rlimit. Either way the
run ends; it never thrashes until the timeout.

Flags left out on purpose: --disallow-code-generation-from-strings (Dify code
may use eval and Function) and --no-expose-wasm (node's own fetch runs its
HTTP parser as WebAssembly, and the seccomp filter and jail bound what a
compiled module can do exactly as they bound JIT code).
"""

from __future__ import annotations

import os
from importlib import resources
from typing import NoReturn

from sandboxd.jail import JailSpec

# Where the daemon binds the live dependency environment's node_modules in the
# node root; require() finds packages there through NODE_PATH.
NODE_MODULES = "/opt/sandboxd/node_modules"

# The whole environment a run sees, with [network] proxy's variables for runs with
# network; nothing of the host's (NODE_OPTIONS, NODE_EXTRA_CA_CERTS, proxies) is passed in.
ENVIRONMENT = {
    "PATH": "/usr/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "USER": "sandbox",
    "NODE_PATH": NODE_MODULES,
}

HEAP_SHARE = 0.75


def bootstrap_source(name: str = "bootstrap.js") -> bytes:
    return resources.files("sandboxd.runtimes").joinpath(name).read_bytes()


def root_files(spec: JailSpec) -> dict[str, bytes]:
    # proxy.js beside the bootstrap: the agent it loads for [network] proxy.
    proxy_agent = os.path.join(os.path.dirname(spec.node_bootstrap), "proxy.js")
    return {spec.node_bootstrap: bootstrap_source(), proxy_agent: bootstrap_source("proxy.js")}


def prepare(spec: JailSpec) -> None:
    """Nothing: node is exec'd with its environment and flags built by argv()."""


def heap_mb(spec: JailSpec) -> int:
    return max(16, int(spec.max_memory_mb * HEAP_SHARE))


def argv(spec: JailSpec) -> list[str]:
    return [spec.node_path, f"--max-old-space-size={heap_mb(spec)}", spec.node_bootstrap]


def start(spec: JailSpec, ready_fd: int) -> NoReturn:
    """Exec node on the bootstrap; it reports ready on ready_fd once loaded."""
    os.set_inheritable(ready_fd, True)
    os.execve(spec.node_path, argv(spec), {**ENVIRONMENT, **spec.proxy_env})
