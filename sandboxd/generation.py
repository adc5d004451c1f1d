"""A generation: one zygote, its pools, and the workers it forks and retires.

Theory of operation
-------------------
The daemon talks to the zygote (zygote.py) over a seqpacket socket through a
ZygoteHandle: each SpawnOrder comes back as five fds (job pipe, stdout, stderr,
readiness pipe, and a pidfd of the worker, the daemon's own child) which become a
WorkerHandle (worker.py). Generation.new_worker
gives each worker a uid (jail/identity.UidPool) and a run cgroup, and
Generation.retire_worker frees them: the uid only once the cgroup is empty (its
reaped exit where there are no cgroups), when the worker's whole pid
namespace is gone. A generation whose zygote dies says so (Shared.on_death),
and the Succession replaces it (succession.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from sandboxd import control, verdict, zygote
from sandboxd.config import Config, pool_sizes
from sandboxd.control import SpawnFailed, SpawnOrder, ZygoteStart
from sandboxd.jail import JailSpec
from sandboxd.jail.cgroup import Backend, RunCgroup, remove_if_empty, remove_when_empty
from sandboxd.jail.identity import UidPool
from sandboxd.jail.scope import Placement
from sandboxd.metrics import Metrics
from sandboxd.pool import Pool, PoolKey
from sandboxd.protocol import Language, ProtocolError
from sandboxd.runtimes import registry
from sandboxd.worker import WorkerHandle

log = logging.getLogger("sandboxd.generation")

ZYGOTE_START_TIMEOUT = 60.0
# How long a retired worker's processes may take to leave its cgroup (they are killed).
VANISHED_GRACE = 10.0


class GenerationFailed(Exception):
    """A new generation could not start (its zygote failed or died while warming up)."""


@dataclass(frozen=True)
class Shared:
    """What every generation of one dispatcher shares, and how it reports back."""

    uids: UidPool
    # Where each generation's run cgroups go (None: rlimits only).
    placement: Placement | None
    metrics: Metrics
    # Worker ids, unique across generations.
    ids: Iterator[int]
    # Runs a task in the dispatcher's nursery (tidying up after a request).
    start_soon: Callable[..., None]
    # A pool's ready count changed: the dispatcher reports the gauge.
    ready_changed: Callable[[Language], None]
    # The zygote died on its own (not retired).
    on_death: Callable[[Generation], None]


class ZygoteHandle:
    """The daemon's handle on the zygote process."""

    def __init__(self, spec: JailSpec) -> None:
        self.spec = spec
        self._lock = trio.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        # The templates' pidfds (runtimes/template.py): they are our children too.
        self._template_pidfds: list[int] = []
        self._sock: trio.socket.SocketType | None = None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            # Forked from this (the main) thread, not a worker thread as trio's
            # open_process does: the workers it clones are children of the thread that
            # forked it (CLONE_PARENT), and their parent-death signal fires when that
            # thread ends, which must be when the daemon does.
            self._process = subprocess.Popen(
                zygote.command(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        self._pidfd = os.pidfd_open(self._process.pid)
        self._sock = trio.socket.from_stdlib_socket(ours)
        await self._sock.send(control.encoder.encode(ZygoteStart(self.spec)))
        with trio.fail_after(ZYGOTE_START_TIMEOUT):
            answer, fds = await self._receive(16)
        self._template_pidfds = fds
        if answer != b"ready":
            raise RuntimeError("the zygote failed to start (see its messages above)")

    async def _receive(self, size: int) -> tuple[bytes, list[int]]:
        assert self._sock is not None
        packet, ancdata, _, _ = await self._sock.recvmsg(
            size, socket.CMSG_SPACE(4 * control.SPAWNED_FDS), socket.MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(memoryview(data).cast("i"))
        return packet, fds

    async def spawn(self, order: SpawnOrder) -> tuple[int, list[int]]:
        """Order one worker; its pid and fds, or ProtocolError(internal) with the reason."""
        assert self._sock is not None
        async with self._lock:
            await self._sock.send(control.encoder.encode(order))
            packet, fds = await self._receive(control.MAX_PACKET)
        if not packet:
            raise ProtocolError("internal", "the zygote died")
        reply = control.zygote_reply_decoder.decode(packet)
        if isinstance(reply, SpawnFailed) or len(fds) != control.SPAWNED_FDS:
            for fd in fds:
                os.close(fd)
            if isinstance(reply, SpawnFailed):
                raise ProtocolError("internal", f"cannot fork a worker: {reply.message}")
            raise ProtocolError("internal", "the zygote sent a worker without its fds")
        return reply.pid, fds

    @property
    def pid(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.pid

    async def wait_exit(self) -> int:
        """Until the zygote process exits (its pidfd); its exit status."""
        assert self._process is not None, "start() first"
        await trio.lowlevel.wait_readable(self._pidfd)
        return self._process.wait()

    async def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._process is not None:
            # Polled: _watch_zygote may still be waiting on the pidfd while it is cancelled.
            with trio.move_on_after(5):
                while self._process.poll() is None:
                    await trio.sleep(0.01)
            if self._process.poll() is None:
                self._process.kill()
                await trio.to_thread.run_sync(self._process.wait)
            os.close(self._pidfd)
            self._pidfd = -1
        for pidfd in self._template_pidfds:
            # It leaves when its socket to the zygote hangs up.
            with trio.move_on_after(5):
                await trio.lowlevel.wait_readable(pidfd)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            # Until it has exited (its pidfd turns readable): waitid on a live template
            # blocks the event loop (in the emulated guest the watchdog fired 26 s after
            # a reload, the old template still alive).
            await trio.lowlevel.wait_readable(pidfd)
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            os.close(pidfd)
        self._template_pidfds = []


class Generation:
    """One zygote and its pools. A reload or a dependency switch starts a new generation
    and retires the old one: its ready workers are closed at once, and its zygote lives
    until its last run is over (its workers are the daemon's children, but a dead
    zygote's generation is replaced: Shared.on_death)."""

    def __init__(self, shared: Shared, spec: JailSpec, config: Config, number: int) -> None:
        self.shared = shared
        self.spec = spec
        # The pools' sizes and the run cgroups' limits.
        self.config = config
        self.zygote = ZygoteHandle(spec)
        plan = pool_sizes(config, spec.runtimes, spec.egress_netns is not None)
        self.pools: dict[PoolKey, Pool] = {
            (name, network): Pool(self, name, registry.named(name).language, size, network)
            for (name, network), size in plan.items()
        }
        self.number = number
        self.live_workers = 0
        # Set when the zygote died on its own: the generation serves nothing more.
        self.dead = False
        self.started_at = 0.0
        # The run cgroups of this generation (None: rlimits only).
        self.cgroups: Backend | None = None
        self._scope = trio.CancelScope()
        self._all_retired = trio.Event()
        self._retiring = False

    async def run(
        self, warm: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the zygote and keep the pools full; started() once every pool is warm
        (or, with warm=False, as soon as the zygote is up: nothing else serves meanwhile).

        Raises GenerationFailed when the zygote cannot start or dies before started()."""
        self.started_at = trio.current_time()
        try:
            await self.zygote.start()
            placement = self.shared.placement
            if placement is not None:
                self.cgroups = await trio.to_thread.run_sync(
                    placement.attach, self.zygote.pid, self.number
                )
        except (OSError, RuntimeError, trio.TooSlowError) as error:
            raise GenerationFailed(f"the zygote did not start: {error!r}") from error
        started = False
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_zygote)
                for pool in self.pools.values():
                    if not warm:
                        nursery.start_soon(pool.refill)
                        continue
                    await nursery.start(pool.refill)
                    if self.dead:
                        break
                if not self.dead:
                    started = True
                    task_status.started()
        if not started:
            raise GenerationFailed("the zygote died while its pools were warming up")

    def pool_for(self, key: PoolKey) -> Pool | None:
        """The pool of `key`, else the one of its language's plain runtime (same network)."""
        pool = self.pools.get(key)
        if pool is None:
            name, network = key
            plain = registry.plain(registry.named(name).language)
            pool = self.pools.get((plain.name, network)) if plain is not None else None
        return pool

    async def _watch_zygote(self) -> None:
        """A zygote exits only when retired (this task is cancelled first), so an exit
        seen here is a fault: stop refilling and let the succession replace us (on_death)."""
        status = await self.zygote.wait_exit()
        log.error(
            "generation %d: the zygote (pid %d) died (status %d)",
            self.number,
            self.zygote.pid,
            status,
        )
        self.dead = True
        self._scope.cancel()
        self.shared.on_death(self)

    def ready_changed(self, language: Language) -> None:
        """A pool of this generation gained or lost a ready worker."""
        self.shared.ready_changed(language)

    async def new_worker(self, runtime: str, language: str, network: bool = False) -> WorkerHandle:
        worker_id = next(self.shared.ids)
        uid = self.shared.uids.acquire()
        cgroup: RunCgroup | None = None
        try:
            if self.cgroups is not None:
                prepared = verdict.default_limits(self.config.limits)
                cgroup = self.cgroups.create(f"w{worker_id}", prepared.cgroup())
            order = SpawnOrder(
                worker_id, runtime, uid, cgroup.procs_files if cgroup is not None else [], network
            )
            pid, fds = await self.zygote.spawn(order)
        except BaseException:
            # A zygote that died mid-order may have cloned the worker already: it exits
            # when its go pipe hangs up, unjailed and before any code; the uid waits for
            # its cgroup.
            with trio.CancelScope(shield=True):
                free = cgroup is None or await trio.to_thread.run_sync(
                    remove_when_empty, cgroup, VANISHED_GRACE
                )
            if free:
                self.shared.uids.release(uid)
            raise
        self.live_workers += 1
        return WorkerHandle(worker_id, language, uid, pid, fds, cgroup, self._worker_closed)

    async def retire_worker(self, worker: WorkerHandle, pool: Pool | None = None) -> None:
        """Close a worker that has exited and been reaped (or kill it first), then ask
        its pool (if any) for a replacement. Shielded: it must finish even at stop."""
        with trio.CancelScope(shield=True):
            await self._retire_worker(worker)
        if pool is not None:
            pool.refill_soon()

    async def _retire_worker(self, worker: WorkerHandle) -> None:
        if worker.exited is None:
            worker.kill()
            with trio.move_on_after(10):
                await worker.wait_exit()
        # The uid is free once no process of the run is left: its cgroup shows that
        # (a killed worker leaves the rest of its pid namespace to the kernel), else its
        # reaped exit.
        if worker.cgroup is not None:
            free = remove_if_empty(worker.cgroup) or await trio.to_thread.run_sync(
                remove_when_empty, worker.cgroup, VANISHED_GRACE
            )
        else:
            free = worker.exited is not None
        if free:
            self.shared.uids.release(worker.uid)
        else:
            log.error("worker %d did not exit; its uid stays reserved", worker.worker_id)
        # Last: closing tells the generation, which removes its cgroups after its last worker.
        await worker.close()

    def _worker_closed(self) -> None:
        self.live_workers -= 1
        if self.live_workers == 0 and self._scope.cancel_called:
            self._all_retired.set()

    async def retire(self) -> None:
        """Stop refilling, close the ready workers, wait for running ones, stop the zygote."""
        self._scope.cancel()
        if self._retiring:
            return
        self._retiring = True
        with trio.CancelScope(shield=True):
            for pool in self.pools.values():
                await pool.drain()
            if self.live_workers:
                await self._all_retired.wait()
            await self.zygote.stop()
            if self.cgroups is not None:
                self.cgroups.close()
