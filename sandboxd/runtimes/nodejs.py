"""The nodejs runtime: its record (RUNTIME), and its runner: the jailed worker execs
node on a small bootstrap (bootstrap.js).

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
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, NoReturn

from sandboxd.jail import JailSpec, RuntimeJail
from sandboxd.runtimes import DepsLayout, Runtime

if TYPE_CHECKING:
    from sandboxd.config import Config, DepsConfig

# Where the daemon binds the live dependency environment's node_modules in the
# node root; require() finds packages there through NODE_PATH.
NODE_MODULES = "/opt/sandboxd/node_modules"
# Where the bootstrap (and proxy.js beside it) is written in the node root.
NODE_BOOTSTRAP = "/opt/sandboxd/bootstrap.js"

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


def jail(config: Config, built: Mapping[str, RuntimeJail]) -> RuntimeJail | str:
    """The node root: the binary of [nodejs] path, what it links, the live node_modules;
    the reason when node is not installed."""
    from sandboxd import deps
    from sandboxd.jail import rootfs

    node = config.nodejs.path
    if not (os.path.isfile(node) and os.access(node, os.X_OK)):
        return f"nodejs is not installed on this host ({node} not found)"
    modules = deps.live_node_modules(config.server.state_dir)
    return RuntimeJail(
        runner="nodejs",
        seccomp_policy="nodejs",
        entries=rootfs.node_entries(node, {modules: NODE_MODULES} if modules else {}),
        environment=modules,
        executable=os.path.realpath(node),
        bootstrap=NODE_BOOTSTRAP,
    )


def environment() -> DepsLayout:
    """Its dependency environment: a node_modules filled by npm (deps.py, imported only
    here, in the daemon: never in the zygote)."""
    from sandboxd import deps

    def sync(
        config: DepsConfig, state_dir: str, offline: bool, wheelhouse: str | None, force: bool
    ) -> str:
        return deps.sync_node(state_dir, config.node_packages, offline, force)

    return DepsLayout(
        "node",
        lambda config: config.node_packages,
        sync,
        deps.live_node_modules,
        deps.installed_node,
        tool=deps.NPM,
    )


RUNTIME = Runtime(
    name="nodejs",
    language="nodejs",
    runner="nodejs",
    seccomp_policy="nodejs",
    section="nodejs",
    jail=jail,
    deps=environment,
)


def bootstrap_source(name: str = "bootstrap.js") -> bytes:
    return resources.files("sandboxd.runtimes").joinpath(name).read_bytes()


def root_files(spec: JailSpec, runtime: RuntimeJail) -> dict[str, bytes]:
    # proxy.js beside the bootstrap: the agent it loads for [network] proxy.
    proxy_agent = os.path.join(os.path.dirname(runtime.bootstrap), "proxy.js")
    return {runtime.bootstrap: bootstrap_source(), proxy_agent: bootstrap_source("proxy.js")}


def before_forks(spec: JailSpec, runtime: RuntimeJail) -> None:
    pass  # node starts afresh in every worker: nothing to share


def prepare(spec: JailSpec, runtime: RuntimeJail) -> None:
    """Nothing: node is exec'd with its environment and flags built by argv()."""


def heap_mb(spec: JailSpec) -> int:
    return max(16, int(spec.max_memory_mb * HEAP_SHARE))


def argv(spec: JailSpec, runtime: RuntimeJail) -> list[str]:
    return [runtime.executable, f"--max-old-space-size={heap_mb(spec)}", runtime.bootstrap]


def start(spec: JailSpec, runtime: RuntimeJail, ready_fd: int) -> NoReturn:
    """Exec node on the bootstrap; it reports ready on ready_fd once loaded."""
    os.set_inheritable(ready_fd, True)
    os.execve(runtime.executable, argv(spec, runtime), {**ENVIRONMENT, **spec.proxy_env})
