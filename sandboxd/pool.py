"""Pools of ready workers, admission control, and dispatch of jobs onto workers.

Theory of operation
-------------------
A Generation is one zygote (zygote.py) and its pools. The daemon talks to the
zygote over a seqpacket socket: each SpawnOrder comes back as four fds (job
pipe, stdout, stderr, keeper socket) which become a WorkerHandle (worker.py). A Pool
per (language, network) keeps `size` workers ready or preparing; a task per
worker waits for its readiness report before the worker is offered, so a
request never pays for jail setup. A taken worker's replacement is ordered
when its run is over (at once if the pool ran dry), so preparing it does not
compete with the run. A reload or a dependency switch starts a new generation
and retires the old one once its last run is over.

Faults heal (Dispatcher._heal): the zygote's exit is watched (its pidfd), and a
zygote that dies is replaced by a new generation with the same spec, without a
reload, backing off while new ones keep failing. Keepers do not die with the
zygote (they answer to the daemon over their own sockets), so runs already on
workers finish, and ready workers are retired through their keepers, which frees
their uids and cgroups. Requests waiting meanwhile move to the new generation,
or get `overloaded` when none is up before their deadline.

Admission (Dispatcher.run): at most max_requests requests are admitted (running
plus waiting); beyond that, `overloaded` at once. A request holds one of
max_workers slots from taking a worker until its run is over. Its deadline
starts at admission, so time spent waiting counts against its timeout. Each
worker runs one job and is then retired: its uid is released only once its
cgroup is empty (its keeper's report where there are no cgroups), when its
whole pid namespace is gone.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable

import trio

from sandboxd import control, deps, profiles, verdict, zygote
from sandboxd.config import Config, effective_pool_size
from sandboxd.control import SpawnFailed, SpawnOrder, ZygoteStart
from sandboxd.jail import JailSpec
from sandboxd.jail.cgroup import Backend, Limits, RunCgroup, remove_when_empty
from sandboxd.jail.identity import UidPool
from sandboxd.jail.scope import Placement
from sandboxd.jobs import Dependency, Job
from sandboxd.metrics import Metrics
from sandboxd.protocol import Language, ProtocolError, RequestId, RunResult
from sandboxd.seccomplog import SeccompLog
from sandboxd.worker import WorkerHandle

log = logging.getLogger("sandboxd.pool")

# A pool per language, and per whether its workers have network.
# (language, with network, profile: profiles.PLAIN or profiles.SCIENCE)
PoolKey = tuple[Language, bool, str]
SpecBuilder = Callable[[Config, bool], tuple[JailSpec, dict[str, str]]]

# Consecutive spawn failures after which requests fail fast instead of waiting.
FAILING_AFTER = 3
READY_TIMEOUT = 30.0
ZYGOTE_START_TIMEOUT = 60.0
MIB = 1024 * 1024
# Pause before healing a dead generation: doubled while new generations keep dying
# within HEAL_RESET seconds of their start, so a broken zygote does not spin.
HEAL_BACKOFF_MIN = 0.05
HEAL_BACKOFF_MAX = 5.0
HEAL_RESET = 30.0
# While a dead generation is being replaced the daemon counts as healthy (systemd's
# watchdog is kept fed) for this long; past it, the watchdog is the last resort.
HEAL_WATCHDOG_GRACE = 120.0
# How long a retired worker's processes may take to leave its cgroup (they are killed).
VANISHED_GRACE = 10.0


class Zygote:
    """The daemon's handle on the zygote process."""

    def __init__(self, spec: JailSpec) -> None:
        self.spec = spec
        self._lock = trio.Lock()
        self._process: trio.Process | None = None
        self._sock: trio.socket.SocketType | None = None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            self._process = await trio.lowlevel.open_process(
                zygote.command(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        await self._sock.send(control.encoder.encode(ZygoteStart(self.spec)))
        with trio.fail_after(ZYGOTE_START_TIMEOUT):
            answer = await self._sock.recv(16)
        if answer != b"ready":
            raise RuntimeError("the zygote failed to start (see its messages above)")

    async def spawn(self, order: SpawnOrder) -> list[int]:
        """Order one worker; its four fds, or ProtocolError(internal) with the reason."""
        assert self._sock is not None
        async with self._lock:
            await self._sock.send(control.encoder.encode(order))
            packet, ancdata, _, _ = await self._sock.recvmsg(
                control.MAX_PACKET, socket.CMSG_SPACE(4 * 4)
            )
        fds: list[int] = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(memoryview(data).cast("i"))
        if not packet:
            raise ProtocolError("internal", "the zygote died")
        reply = control.zygote_reply_decoder.decode(packet)
        if isinstance(reply, SpawnFailed):
            for fd in fds:
                os.close(fd)
            raise ProtocolError("internal", f"cannot fork a worker: {reply.message}")
        if len(fds) != 4:
            raise ProtocolError("internal", "the zygote sent a worker without its fds")
        return fds

    @property
    def pid(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.pid

    async def wait_exit(self) -> int:
        """Until the zygote process exits (its pidfd); its exit status."""
        assert self._process is not None, "start() first"
        return await self._process.wait()

    async def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._process is not None:
            with trio.move_on_after(5):
                await self._process.wait()
            if self._process.returncode is None:
                self._process.kill()
                await self._process.wait()


class PoolRetired(Exception):
    """The pool's generation was replaced while a request waited for one of its workers."""


class GenerationFailed(Exception):
    """A new generation could not start (its zygote failed or died while warming up)."""


class Pool:
    """Ready workers of one language, all forked by one generation's zygote."""

    def __init__(
        self,
        generation: Generation,
        language: Language,
        size: int,
        network: bool = False,
        profile: str = profiles.PLAIN,
    ) -> None:
        self.generation = generation
        self.dispatcher = generation.dispatcher
        self.language = language
        # Whether its workers live in the egress network namespace.
        self.network = network
        # Which template forks its workers (profiles.py).
        self.profile = profile
        self.size = size
        self.preparing = 0
        self._send, self._receive = trio.open_memory_channel[WorkerHandle](size)
        self._wanted = trio.Event()
        self.failures = 0
        self.last_error = ""

    @property
    def ready(self) -> int:
        return self._send.statistics().current_buffer_used

    async def refill(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep `size` workers ready or preparing, for the life of the daemon."""
        async with trio.open_nursery() as nursery:
            started = False
            while True:
                while self.ready + self.preparing < self.size:
                    self.preparing += 1
                    nursery.start_soon(self._prepare_one)
                # Warm, or failing: a language whose workers cannot start must not keep
                # the daemon from serving the others (its requests get `internal`).
                if not started and (self.ready >= self.size or self.failures >= FAILING_AFTER):
                    started = True
                    task_status.started()
                await self._wanted.wait()
                self._wanted = trio.Event()

    async def _prepare_one(self) -> None:
        worker: WorkerHandle | None = None
        offered = False
        try:
            worker = await self.dispatcher.new_worker(
                self.generation, self.language, self.network, self.profile
            )
            with trio.fail_after(READY_TIMEOUT):
                await worker.wait_ready()
            self._send.send_nowait(worker)
            offered = True
            self.failures = 0
        except trio.ClosedResourceError:
            pass  # the generation was retired while this worker got ready
        except (ProtocolError, trio.TooSlowError, OSError) as exc:
            self.failures += 1
            self.last_error = str(exc)
            self.dispatcher.metrics.spawn_failed(self.language)
            log.error("%s worker failed to start: %s", self.language, exc)
            # Back off so a broken jail does not spin the zygote.
            await trio.sleep(min(5.0, 0.05 * 2 ** min(self.failures, 7)))
        finally:
            if worker is not None and not offered:
                with trio.CancelScope(shield=True):
                    await self.dispatcher.retire(worker)
            self.preparing -= 1
            self._wanted.set()
            self.dispatcher.report_ready(self.language)

    async def drain(self) -> None:
        """Close the pool and retire every ready worker (its refill task is cancelled first).
        Requests waiting in take() get PoolRetired and go to the current generation."""
        self._send.close()
        while True:
            try:
                worker = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            await self.dispatcher.retire(worker)

    async def take(self) -> WorkerHandle:
        if self.generation.dead:
            raise PoolRetired
        if self.failures >= FAILING_AFTER and self.ready == 0:
            raise ProtocolError(
                "internal", f"{self.language} workers fail to start: {self.last_error}"
            )
        while True:
            try:
                worker = await self._receive.receive()
            except trio.EndOfChannel:
                raise PoolRetired from None
            if not worker.gone():
                break
            # Killed while it waited here (e.g. kill -9 of the worker): never hand it out.
            self.dispatcher.start_soon(self.dispatcher.retire, worker, self)
        # The replacement is ordered once this run is over (refill()), so that preparing
        # it does not compete with the run for CPU; only an empty pool refills at once.
        if self.ready == 0:
            self.refill_soon()
        self.dispatcher.report_ready(self.language)
        return worker

    def refill_soon(self) -> None:
        self._wanted.set()

    @property
    def serving(self) -> bool:
        """Whether a run can get a worker here: one is ready, or starting them works."""
        return self.ready > 0 or self.failures < FAILING_AFTER


class Generation:
    """One zygote and its pools. A reload or a dependency switch starts a new generation
    and retires the old one: its ready workers are closed at once, and its zygote (whose
    death would kill its keepers and so their workers) lives until its last run is over."""

    def __init__(self, dispatcher: Dispatcher, spec: JailSpec) -> None:
        self.dispatcher = dispatcher
        self.spec = spec
        self.zygote = Zygote(spec)
        config = dispatcher.config
        sizes: dict[Language, int] = {
            "python3": config.python3.pool_size,
            "nodejs": config.nodejs.pool_size,
        }
        self.pools: dict[PoolKey, Pool] = {
            (language, False, profiles.PLAIN): Pool(self, language, effective_pool_size(size))
            for language, size in sizes.items()
            if language in spec.roots
        }
        if spec.egress_netns is not None:
            # Runs that asked for network ([network] mode = "allow") get their own,
            # smaller pools of workers in the egress network namespace.
            for language, size in sizes.items():
                if language in spec.roots:
                    net_size = max(1, effective_pool_size(size) // 2)
                    self.pools[(language, True, profiles.PLAIN)] = Pool(
                        self, language, net_size, network=True
                    )
        if spec.python_warm_modules and spec.python_site_packages is not None:
            # Runs that import a warm module get workers of the data-science template,
            # half as many as their plain twins (the same network split).
            for language, network, _ in list(self.pools):
                if language == "python3":
                    size = max(1, self.pools[(language, network, profiles.PLAIN)].size // 2)
                    self.pools[(language, network, profiles.SCIENCE)] = Pool(
                        self, language, size, network, profiles.SCIENCE
                    )
        self.number = next(dispatcher.generations)
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
            placement = self.dispatcher.placement
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

    async def _watch_zygote(self) -> None:
        """A zygote exits only when retired (this task is cancelled first), so an exit
        seen here is a fault: stop refilling and let the dispatcher replace us."""
        status = await self.zygote.wait_exit()
        log.error(
            "generation %d: the zygote (pid %d) died (status %d)",
            self.number,
            self.zygote.pid,
            status,
        )
        self.dead = True
        self._scope.cancel()
        self.dispatcher.generation_died(self)

    def worker_started(self) -> None:
        self.live_workers += 1

    def worker_retired(self) -> None:
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


class Dispatcher:
    """The daemon's core service: admission, generations of pools, runs (jobs.Service)."""

    def __init__(
        self,
        config: Config,
        spec: JailSpec,
        placement: Placement | None,
        metrics: Metrics,
        unavailable: dict[str, str] | None = None,
        spec_builder: SpecBuilder | None = None,
    ) -> None:
        self.config = config
        # Where each generation's run cgroups go (None: rlimits only).
        self.placement = placement
        # Builds the jail spec anew (after a dependency sync), with the languages it lacks.
        self._spec_builder = spec_builder
        self.metrics = metrics
        # Languages that cannot be served, with the reason (e.g. node not installed).
        self.unavailable = unavailable or {}
        self.uids = UidPool(config.jail.uid_min, config.jail.uid_max)
        self.slots = trio.CapacityLimiter(config.limits.max_workers)
        self._report_slots()
        self.admitted = 0
        self.runs_served = 0
        # Set at stop: new requests are refused (retryable) while in-flight ones finish.
        self.stopping = False
        self._idle = trio.Event()
        self._ids = itertools.count(1)
        self.generations = itertools.count(1)
        self.generation = Generation(self, spec)
        self.seccomp_log = SeccompLog()
        self._nursery: trio.Nursery | None = None
        self._replacing = trio.Lock()
        # Set (and renewed) each time a new generation starts serving.
        self._switched = trio.Event()
        self._heal_backoff = 0.0
        # Generations started in place of one whose zygote died.
        self.heals = 0
        # When the serving generation's zygote died (None while it is alive).
        self._dead_since: float | None = None

    @property
    def spec(self) -> JailSpec:
        return self.generation.spec

    @property
    def pools(self) -> dict[PoolKey, Pool]:
        return self.generation.pools

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the first generation; returns once all its workers are ready."""
        self._nursery = nursery
        try:
            await nursery.start(self.generation.run)
        except GenerationFailed:
            if not self.generation.dead:
                raise  # the zygote cannot start at all: the daemon cannot serve
            log.error("the first zygote died while it warmed up; starting another")
            while self.generation.dead:  # _heal, started by generation_died, is on it
                await self._switched.wait()

    def start_soon(self, task: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a task in the dispatcher's nursery (tidying up after a request)."""
        assert self._nursery is not None, "start() first"
        self._nursery.start_soon(task, *args)

    async def _start_generation(self, spec: JailSpec, warm: bool = True) -> Generation:
        """A new generation (warm, or with its zygote up); GenerationFailed (with nothing
        left running) if not."""
        assert self._nursery is not None, "start() first"
        fresh = Generation(self, spec)
        try:
            await self._nursery.start(fresh.run, warm)
        except GenerationFailed:
            await fresh.retire()
            raise
        if fresh.dead:  # died right after warming up (and is being retired)
            raise GenerationFailed("the zygote died as its generation started")
        return fresh

    def healthy(self) -> bool:
        """Whether systemd's watchdog should be fed: every pool of the serving generation
        starts its workers, or a dead generation is being replaced (for a while)."""
        if self._dead_since is not None:
            return trio.current_time() - self._dead_since < HEAL_WATCHDOG_GRACE
        return all(p.failures < FAILING_AFTER for p in self.pools.values())

    def _serve_from(self, fresh: Generation) -> Generation:
        old, self.generation = self.generation, fresh
        self._dead_since = None
        self._switched.set()
        self._switched = trio.Event()
        return old

    async def replace(self, config: Config, spec: JailSpec, unavailable: dict[str, str]) -> None:
        """Serve from a new generation once it is warm; runs in flight finish on the old.
        Raises GenerationFailed (the old generation goes on serving) if it cannot start."""
        async with self._replacing:
            running, self.config = self.config, config  # the new pools' sizes and limits
            try:
                fresh = await self._start_generation(spec)
            except GenerationFailed:
                self.config = running
                raise
            self.slots.total_tokens = config.limits.max_workers
            self._report_slots()
            self.unavailable = unavailable
            self.start_soon(self._serve_from(fresh).retire)

    def generation_died(self, dead: Generation) -> None:
        """Called by a generation whose zygote died: retire it, and heal if it served."""
        self.start_soon(dead.retire)
        if dead is self.generation and not self.stopping:
            self._dead_since = trio.current_time()
            self.start_soon(self._heal, dead)

    async def _heal(self, dead: Generation) -> None:
        """Replace a dead generation by one with the same spec, backing off on failure."""
        async with self._replacing:
            if trio.current_time() - dead.started_at > HEAL_RESET:
                self._heal_backoff = 0.0
            while dead is self.generation and not self.stopping:
                if self._heal_backoff:
                    log.warning("next generation in %.2f s", self._heal_backoff)
                    await trio.sleep(self._heal_backoff)
                self._heal_backoff = min(
                    HEAL_BACKOFF_MAX, max(HEAL_BACKOFF_MIN, 2 * self._heal_backoff)
                )
                try:
                    # Nothing serves meanwhile: switch once the zygote is up, and let
                    # waiting requests take its first workers as they get ready.
                    fresh = await self._start_generation(dead.spec, warm=False)
                except GenerationFailed as error:
                    log.error("healing: %s", error)
                    continue
                self._serve_from(fresh)
                self.heals += 1
                log.info("healed: generation %d serves", fresh.number)

    async def _serving_pool(self, key: PoolKey) -> Pool:
        """The current generation's pool for `key`, once the generation is alive."""
        while self.generation.dead:
            await self._switched.wait()
        language, network, _ = key
        return self.pools.get(key) or self.pools[(language, network, profiles.PLAIN)]

    def why_unavailable(self) -> str | None:
        """Why a run cannot be taken now, or None (what GET /health reports)."""
        if self.stopping:
            return "the daemon is stopping"
        if not any(pool.serving for pool in self.pools.values()):
            return "no pool can start workers"
        return None

    def _report_slots(self) -> None:
        self.metrics.set_slots(int(self.slots.borrowed_tokens), int(self.slots.total_tokens))

    def report_ready(self, language: Language) -> None:
        """The ready-workers gauge of a language: its pools with and without network."""
        ready = sum(p.ready for p in self.pools.values() if p.language == language)
        self.metrics.set_ready_workers(language, ready)

    async def dependencies(self, language: Language) -> list[Dependency]:
        """What the serving jail holds (after a CLI sync, the new env serves only on reload)."""
        bound = [e.path for e in self.spec.roots.get(language, []) if e.target]
        if language == "python3":
            return await trio.to_thread.run_sync(deps.installed_python, bound[0] if bound else None)
        return await trio.to_thread.run_sync(deps.installed_node, bound[0] if bound else None)

    async def sync_dependencies(self, language: Language) -> None:
        """Rebuild the environment from its requirements, then switch pools onto it.

        A failed sync leaves the live environment (and every pool) as it was.
        """
        config = self.config
        try:
            await trio.to_thread.run_sync(
                deps.sync_configured, config.deps, config.server.state_dir, language
            )
        except deps.NoSourceFile:
            return  # nothing to sync: the live environment stays, as in dify-sandbox
        except deps.SyncError as error:
            raise ProtocolError("internal", f"dependency sync failed: {error}") from error
        if self._spec_builder is not None:
            spec, unavailable = await trio.to_thread.run_sync(
                self._spec_builder, config, self.placement is not None
            )
            if spec != self.spec:
                try:
                    await self.replace(config, spec, unavailable)
                except GenerationFailed as error:
                    raise ProtocolError("internal", f"new environment: {error}") from error

    async def stop(self) -> None:
        """Retire the current generation (ready workers closed, zygote stopped)."""
        await self.generation.retire()
        self.seccomp_log.close()

    def _limits(self) -> Limits:
        limits = self.config.limits
        return Limits(limits.memory_mb * MIB, limits.tasks, limits.cpu_percent)

    async def new_worker(
        self,
        generation: Generation,
        language: str,
        network: bool = False,
        profile: str = profiles.PLAIN,
    ) -> WorkerHandle:
        worker_id = next(self._ids)
        uid = self.uids.acquire()
        cgroup: RunCgroup | None = None
        try:
            if generation.cgroups is not None:
                cgroup = generation.cgroups.create(f"w{worker_id}", self._limits())
            order = SpawnOrder(
                worker_id,
                language,
                uid,
                cgroup.procs_files if cgroup is not None else [],
                network,
                profile,
            )
            fds = await generation.zygote.spawn(order)
        except BaseException:
            # A zygote that died mid-order may have forked the keeper already: its worker
            # is killed when the keeper's socket hangs up; the uid waits for its cgroup.
            with trio.CancelScope(shield=True):
                free = cgroup is None or await trio.to_thread.run_sync(
                    remove_when_empty, cgroup, VANISHED_GRACE
                )
            if free:
                self.uids.release(uid)
            raise
        generation.worker_started()
        return WorkerHandle(worker_id, language, uid, fds, cgroup, generation.worker_retired)

    async def retire(self, worker: WorkerHandle, pool: Pool | None = None) -> None:
        """Close a worker whose keeper has reported its exit (or kill it first), then ask
        its pool (if any) for a replacement. Shielded: it must finish even at stop."""
        with trio.CancelScope(shield=True):
            await self._retire(worker)
        if pool is not None:
            pool.refill_soon()

    async def _retire(self, worker: WorkerHandle) -> None:
        if worker.exited is None:
            await worker.kill()
            with trio.move_on_after(10):
                await worker.wait_exit()
        # The uid is free once no process of the run is left: its cgroup shows that
        # (even when its keeper vanished and reported nothing), else the keeper's report.
        if worker.cgroup is not None:
            free = await trio.to_thread.run_sync(remove_when_empty, worker.cgroup, VANISHED_GRACE)
        else:
            free = worker.exited is not None
        if free:
            self.uids.release(worker.uid)
        else:
            log.error("worker %d did not exit; its uid stays reserved", worker.worker_id)
        # Last: closing tells the generation, which removes its cgroups after its last worker.
        await worker.close()

    async def wait_idle(self) -> None:
        """Until no request is admitted."""
        while self.admitted:
            self._idle = trio.Event()
            await self._idle.wait()

    def _admit(self) -> None:
        if self.stopping:
            self.metrics.refused("stopping")
            raise ProtocolError("overloaded", "the daemon is stopping; retry in a moment")
        if self.admitted >= self.config.limits.max_requests:
            self.metrics.refused("queue_full")
            raise ProtocolError("overloaded", "too many requests: the queue is full, retry later")
        self.admitted += 1
        self.metrics.set_queue_depth(max(0, self.admitted - self.config.limits.max_workers))

    def _pool_key(self, job: Job) -> PoolKey:
        warm = self.generation.spec.python_warm_modules if job.language == "python3" else []
        return (job.language, job.network, profiles.choose((job.preload, job.code), warm))

    async def run(self, job: Job, request_id: RequestId) -> RunResult:
        if job.language in self.unavailable:
            raise ProtocolError("unsupported_language", self.unavailable[job.language])
        pool = self.pools.get(self._pool_key(job)) or self.pools.get(
            (job.language, job.network, profiles.PLAIN)
        )
        if pool is None:
            raise ProtocolError("unsupported_language", f"{job.language} is not served here")
        self._admit()
        started = trio.current_time()
        deadline = started + job.timeout
        try:
            result = await self._run_admitted(pool, job, request_id, deadline, started)
        except ProtocolError:
            raise
        except Exception as error:
            # A fault of ours must cost this request only, never the daemon.
            log.exception("run failed inside the daemon")
            raise ProtocolError("internal", f"sandbox failure: {error}") from error
        finally:
            self.admitted -= 1
            if not self.admitted:
                self._idle.set()
            self.metrics.set_queue_depth(max(0, self.admitted - self.config.limits.max_workers))
        self.runs_served += 1
        self.metrics.observe_run(job.language, result.status, trio.current_time() - started)
        return result

    async def _run_admitted(
        self, pool: Pool, job: Job, request_id: RequestId, deadline: float, started: float
    ) -> RunResult:
        """Hold one slot from taking a worker until the worker is retired."""
        worker: WorkerHandle | None = None
        holding = False
        healing = False
        try:
            with trio.move_on_at(deadline):
                await self.slots.acquire()
                holding = True
                self._report_slots()
                while worker is None:
                    try:
                        worker = await pool.take()
                    except PoolRetired:
                        healing = self.generation.dead
                        pool = await self._serving_pool(self._pool_key(job))
                        healing = False
            self.metrics.observe_queue_wait(job.language, trio.current_time() - started)
            if worker is None and healing:
                raise ProtocolError(
                    "overloaded",
                    f"the {job.language} workers are being restarted after a fault; "
                    "retry in a few seconds",
                )
            if worker is None:
                return verdict.queued_too_long(request_id, (trio.current_time() - started) * 1000)
            try:
                if worker.cgroup is not None and job.memory_mb != self.config.limits.memory_mb:
                    try:
                        worker.cgroup.set_memory_limit(job.memory_mb * MIB)
                    except OSError as error:  # EBUSY: below what the runtime already uses
                        raise ProtocolError(
                            "bad_request",
                            f"memory_mb={job.memory_mb} is below what a {job.language} "
                            f"worker needs to start ({error.strerror})",
                        ) from error
                result = await worker.run(
                    job,
                    request_id,
                    deadline,
                    self.config.limits.output_bytes,
                    0 if worker.cgroup is not None else job.memory_mb,
                )
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.retire(worker, pool)
                raise
            # The run is over (its keeper reaped it): answer now, tidy up after.
            self.start_soon(self.retire, worker, pool)
        finally:
            if holding:
                self.slots.release()
                self._report_slots()
        if result.status == "blocked_syscall" and worker.pid is not None:
            call = await self.seccomp_log.syscall_of(worker.pid)
            result = verdict.with_blocked_call(result, call.describe() if call else None)
        return result
