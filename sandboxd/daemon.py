"""The daemon's lifecycle: build the jail spec, start the pools, take or bind the
sockets, serve until a signal, stop gracefully.

One nursery tree: serve() -> {accept loops, connections, pools, watchdog}.
Stopping (SIGTERM/SIGINT): stop accepting, let in-flight runs finish up to
[server] stop_timeout, then cancel the rest (workers are killed through their pidfds).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import msgspec
import trio

from sandboxd import deps, http, server, systemd
from sandboxd.budget import ByteBudget
from sandboxd.config import Config, ConfigError, RuntimeSection, parse_listen
from sandboxd.dispatcher import Dispatcher
from sandboxd.generation import GenerationFailed
from sandboxd.jail import JailSpec, RuntimeJail, cgroup, identity, network, rlimits, scope
from sandboxd.jail.scope import Placement
from sandboxd.metrics import Metrics
from sandboxd.pool import Pool
from sandboxd.runtimes import registry

log = logging.getLogger("sandboxd")

STATUS_INTERVAL = 5.0


class StartupError(Exception):
    """The daemon cannot start as configured; the message says why."""


def build_spec(config: Config, cgroups_in_force: bool) -> tuple[JailSpec, dict[str, str]]:
    """The jail spec, and the runtimes that cannot be served with the reason why."""
    built: dict[str, RuntimeJail] = {}
    unavailable: dict[str, str] = {}
    for runtime in registry.RUNTIMES:
        jail = runtime.jail(config, built)
        if isinstance(jail, str):
            unavailable[runtime.name] = jail
            continue
        if jail is None:
            continue
        section: RuntimeSection = getattr(config, runtime.section)
        jail = msgspec.structs.replace(
            jail,
            runner=runtime.runner,
            seccomp_policy=runtime.seccomp_policy,
            extra_syscalls=list(section.extra_syscalls),
        )
        # Workers whose roots would hold the same share one root template.
        same = (
            o.root or n
            for n, o in built.items()
            if (o.runner, o.entries, o.bootstrap) == (jail.runner, jail.entries, jail.bootstrap)
        )
        built[runtime.name] = msgspec.structs.replace(jail, root=next(same, ""))
    limits = config.limits
    # With cgroups the memory and tasks verdicts come from the kernel's cgroup counters,
    # so the rlimits on data and processes are only backstops above the cgroup limits.
    backstop = 2 if cgroups_in_force else 1
    egress = None
    proxy_env: dict[str, str] = {}
    if config.network.mode == "allow":
        try:
            egress, proxy_env = network.setup_proxied_egress(
                os.getpid(), config.server.runtime_dir, config.network.proxy
            )
        except network.EgressError as error:
            raise StartupError(f'[network] mode = "allow": no egress network: {error}') from error
    spec = JailSpec(
        runtime_dir=config.server.runtime_dir,
        hostname=config.jail.hostname,
        tmp_size_mb=limits.tmp_size_mb,
        max_memory_mb=limits.max_memory_mb * backstop,
        max_cpu_seconds=rlimits.cpu_seconds(limits.max_timeout),
        tasks=limits.tasks * backstop,
        file_size_mb=limits.file_size_mb,
        open_files=limits.open_files,
        runtimes=built,
        egress_netns=egress,
        proxy_env=proxy_env,
    )
    return spec, unavailable


def choose_cgroups(config: Config) -> Placement | None:
    """Where run cgroups go per [limits] cgroups; StartupError if "systemd" is impossible."""
    try:
        placement = scope.choose(config.limits.cgroups)
    except RuntimeError as error:
        raise StartupError(str(error)) from error
    if placement is None and config.limits.cgroups != "off":
        log.warning(
            "no usable cgroups: memory and task limits are rlimits only, and the memory and "
            'tasks verdicts cannot be given (set [limits] cgroups = "off" to silence this)'
        )
    return placement


@dataclass
class Listeners:
    ndjson: list[trio.SocketListener]
    http: list[trio.SocketListener]


def open_listeners(config: Config, passed: dict[str, list[int]]) -> Listeners:
    """Sockets systemd passed by name, or our own per the config."""

    def adopt(name: str) -> list[trio.SocketListener]:
        return [server.listener(socket.socket(fileno=fd)) for fd in passed.get(name, [])]

    ndjson = adopt("ndjson")
    if not passed:
        ndjson = [
            server.listener(
                server.bind_unix(
                    config.server.socket, config.server.socket_mode, config.server.socket_group
                )
            )
        ]
    web = adopt("http")
    address = parse_listen(config.http.listen)
    if not passed and address is not None:
        web = [server.listener(server.bind_tcp(*address))]
    return Listeners(ndjson, web)


def _clean_runtime_dir(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    for name in os.listdir(path):
        if name.startswith("root-"):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def remove_leftovers(runtime_dir: str) -> list[str]:
    """Remove what daemons killed with SIGKILL left on the host (each object names its
    daemon's pid; live neighbours' objects stay): v1 cgroups, generation scopes, egress
    namespace files, veths and nft tables. The root templates need nothing: they are
    mounted only in the zygote's own mount namespace, which dies with its processes."""
    removed = [
        *cgroup.remove_stale_legacy(),
        *scope.remove_stale_scopes(),
        *network.remove_stale_namespaces(),
    ]
    try:
        network.cleanup_stale(runtime_dir)
    except network.EgressError as error:
        log.error("cannot remove a dead daemon's egress network: %s", error)
    if removed:
        log.warning("removed what dead daemons left: %s", ", ".join(removed))
    return removed


# The daemon moves bytes for every run: when a worker's wake-up competes with it for
# a CPU, the daemon should win, or every answer waits behind the runs it serves.
DAEMON_NICE = -5
# Seconds connections stay open after the last run, to answer late requests with an error.
STOP_GRACE = 0.5


async def serve(
    config: Config,
    reload_config: Callable[[], Config] | None = None,
    task_status: trio.TaskStatus[Dispatcher] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT; on SIGHUP re-read the config with `reload_config`."""
    http.check_http_exposure(config)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, DAEMON_NICE)  # sandboxd.service sets Nice= itself
    except PermissionError:
        log.warning("cannot raise the daemon's priority (no CAP_SYS_NICE); runs may queue longer")
    uid_claim = claim_uids(config)
    passed = systemd.listen_fds()
    notifier = systemd.Notifier.from_environ()
    remove_leftovers(config.server.runtime_dir)
    cgroups = choose_cgroups(config)
    spec, unavailable = build_spec(config, cgroups is not None)
    _clean_runtime_dir(config.server.runtime_dir)
    metrics = Metrics()
    dispatcher = Dispatcher(config, spec, cgroups, metrics, unavailable, build_spec)
    for language, reason in unavailable.items():
        log.warning("%s: %s", language, reason)
    listeners = open_listeners(config, passed)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as root:
            await dispatcher.start(root)
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                budget = ByteBudget(config.clients.max_buffered_bytes)
                ndjson = partial(
                    server.serve_ndjson, service=dispatcher, config=config, budget=budget
                )
                web = partial(
                    http.serve_http,
                    service=dispatcher,
                    config=config,
                    metrics=metrics,
                    budget=budget,
                )
                cap = config.clients.max_connections
                kinds = [
                    (listeners.ndjson, ndjson, server.ndjson_refusal(cap)),
                    (listeners.http, web, http.overloaded_refusal(cap)),
                ]

                async def accept_all() -> None:
                    with accepting:
                        async with trio.open_nursery() as loops:
                            for items, handler, refusal in kinds:
                                for item in items:
                                    loops.start_soon(
                                        server.serve_listener,
                                        item,
                                        handler,
                                        refusal,
                                        cap,
                                        connections,
                                    )

                connections.start_soon(accept_all)
                root.start_soon(_status_loop, dispatcher, notifier)
                notifier.ready()
                log.info(
                    "sandboxd ready: %s",
                    describe_pools(dispatcher),
                )
                task_status.started(dispatcher)
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        break
                    if reload_config is not None:
                        notifier.reloading()
                        config = await reload(dispatcher, config, reload_config)
                        notifier.ready()
                log.info("stopping: no new connections; waiting for %d runs", dispatcher.admitted)
                notifier.stopping()
                # Unhealthy first (GET /health answers 503), then drain.
                dispatcher.stopping = True
                accepting.cancel()
                for item in [*listeners.ndjson, *listeners.http]:
                    await item.aclose()
                with trio.move_on_after(config.server.stop_timeout):
                    await dispatcher.wait_idle()
                # Requests that clients sent meanwhile are read and answered "stopping"
                # (never silence) before the connections close.
                await trio.sleep(STOP_GRACE)
                connections.cancel_scope.cancel()
            root.cancel_scope.cancel()
    await dispatcher.stop()
    # The daemon's own record of what it ran (a balancer test adds these up over daemons).
    log.info("stopped: %d runs answered", dispatcher.runs_served)
    network.teardown_egress(os.getpid(), config.server.runtime_dir)
    if dispatcher.placement is not None:
        dispatcher.placement.close()
    uid_claim.close()


def claim_uids(config: Config) -> identity.UidClaim:
    """This daemon's hold on its [jail] uid range; StartupError if another daemon has it."""
    try:
        return identity.claim_uid_range(config.jail.uid_min, config.jail.uid_max)
    except OSError as error:
        raise StartupError(str(error)) from error


async def reload(
    dispatcher: Dispatcher, config: Config, reload_config: Callable[[], Config]
) -> Config:
    """Re-read the config and switch to a new generation of pools; keep the old on error.

    Listening sockets stay as they are (a restart changes them); in-flight runs finish.
    """
    try:
        fresh = await trio.to_thread.run_sync(reload_config)
        http.check_http_exposure(fresh)
    except (ConfigError, http.ExposureError) as error:
        log.error("reload refused, keeping the running configuration: %s", error)
        return config
    for key in ("socket", "socket_mode", "socket_group", "runtime_dir"):
        if getattr(fresh.server, key) != getattr(config.server, key):
            log.warning("server.%s changed: it takes effect on restart, not reload", key)
    if fresh.http.listen != config.http.listen:
        log.warning("http.listen changed: it takes effect on restart, not reload")
    fresh = msgspec.structs.replace(
        fresh, server=msgspec.structs.replace(fresh.server, runtime_dir=config.server.runtime_dir)
    )
    for runtime in registry.with_deps():
        assert runtime.deps is not None
        layout = runtime.deps()
        if not os.path.exists(layout.source(fresh.deps)):
            continue  # no requirements file: that runtime has no dependencies to sync
        try:
            # A no-op in milliseconds when the requirements file is unchanged.
            await trio.to_thread.run_sync(
                layout.sync, fresh.deps, fresh.server.state_dir, False, None, False
            )
        except deps.SyncError as error:
            log.error("reload: %s dependencies unchanged: %s", runtime.name, error)
    try:
        spec, unavailable = await trio.to_thread.run_sync(
            build_spec, fresh, dispatcher.placement is not None
        )
    except StartupError as error:
        log.error("reload refused, keeping the running configuration: %s", error)
        return config
    try:
        await dispatcher.replace(fresh, spec, unavailable)
    except GenerationFailed as error:
        log.error("reload failed, keeping the running configuration: %s", error)
        return config
    log.info("reloaded: %s", describe_pools(dispatcher))
    return fresh


def _named_pools(dispatcher: Dispatcher) -> list[tuple[str, Pool]]:
    return [
        (
            p.language
            + (f"+{p.runtime}" if p.runtime != p.language else "")
            + ("+net" if p.network else ""),
            p,
        )
        for p in dispatcher.pools.values()
    ]


def describe_pools(dispatcher: Dispatcher) -> str:
    return ", ".join(f"{name} x{p.size}" for name, p in _named_pools(dispatcher))


async def _status_loop(dispatcher: Dispatcher, notifier: systemd.Notifier) -> None:
    """STATUS= for systemctl status, and WATCHDOG=1 while the event loop turns."""
    interval = notifier.watchdog_interval()
    period = min(STATUS_INTERVAL, interval / 2) if interval else STATUS_INTERVAL
    while True:
        ready = ", ".join(f"{name} {p.ready}/{p.size}" for name, p in _named_pools(dispatcher))
        notifier.status(f"ready workers: {ready}; runs served: {dispatcher.runs_served}")
        if dispatcher.healthy():
            notifier.watchdog()
        await trio.sleep(period)
