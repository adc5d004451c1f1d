"""The dispatcher: admission and dispatch of jobs onto the serving generation's workers.

Theory of operation
-------------------
A Generation (generation.py) is one zygote and its pools (pool.py); which one
serves, and its replacement on a reload, a dependency switch or a zygote's death,
is the Succession's (succession.py).

Admission (admission.py, Dispatcher.run): at most max_requests requests are
admitted (running plus waiting); beyond that, `overloaded` at once. A request
holds one of max_workers slots from taking a worker until its run is over. Its
deadline starts at admission, so time spent waiting counts against its timeout;
a request whose pool was retired while it waited moves to the serving one
(Succession.serving_pool). Each worker runs one job and is then retired
(Generation.retire_worker). What the run came to is decided in verdict.py.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from sandboxd import deps, verdict
from sandboxd.admission import Admission
from sandboxd.config import Config
from sandboxd.generation import Generation, GenerationFailed
from sandboxd.jail import JailSpec
from sandboxd.jail.scope import Placement
from sandboxd.jobs import Dependency, Job
from sandboxd.metrics import Metrics
from sandboxd.pool import Pool, PoolKey, PoolRetired
from sandboxd.protocol import Language, ProtocolError, RequestId, RunResult
from sandboxd.runtimes import registry
from sandboxd.seccomplog import SeccompLog
from sandboxd.succession import Succession
from sandboxd.worker import WorkerHandle

log = logging.getLogger("sandboxd.dispatcher")

SpecBuilder = Callable[[Config, bool], tuple[JailSpec, dict[str, str]]]


class Dispatcher:
    """The daemon's core service (jobs.Service): admission, runs, dependency syncs."""

    def __init__(
        self,
        config: Config,
        spec: JailSpec,
        placement: Placement | None,
        metrics: Metrics,
        unavailable: dict[str, str] | None = None,
        spec_builder: SpecBuilder | None = None,
    ) -> None:
        # Where each generation's run cgroups go (None: rlimits only).
        self.placement = placement
        # Builds the jail spec anew (after a dependency sync), with the languages it lacks.
        self._spec_builder = spec_builder
        self.metrics = metrics
        # Languages that cannot be served, with the reason (e.g. node not installed).
        self.unavailable = unavailable or {}
        self.slots = trio.CapacityLimiter(config.limits.max_workers)
        self._report_slots()
        self.admission = Admission(lambda: self.config.limits, metrics)
        self.runs_served = 0
        self.succession = Succession(
            config,
            spec,
            placement,
            metrics,
            self.start_soon,
            self.report_ready,
            lambda: self.admission.stopping,
        )
        self.seccomp_log = SeccompLog()
        self._nursery: trio.Nursery | None = None

    @property
    def admitted(self) -> int:
        """Requests admitted: running plus waiting for a worker."""
        return self.admission.admitted

    @property
    def stopping(self) -> bool:
        """Set at stop: new requests are refused (retryable) while in-flight ones finish."""
        return self.admission.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.admission.stopping = value

    @property
    def config(self) -> Config:
        """The running config: the limits of admission and runs, the next pools' sizes."""
        return self.succession.config

    @property
    def generation(self) -> Generation:
        """The serving generation."""
        return self.succession.generation

    @property
    def heals(self) -> int:
        """Generations started in place of one whose zygote died."""
        return self.succession.heals

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the first generation; returns once all its workers are ready."""
        self._nursery = nursery
        await self.succession.start(nursery)

    def healthy(self) -> bool:
        """Whether systemd's watchdog should be fed (Succession.healthy)."""
        return self.succession.healthy()

    async def replace(self, config: Config, spec: JailSpec, unavailable: dict[str, str]) -> None:
        """Serve from a new generation once it is warm (Succession.replace), with its
        config's slots and the languages it lacks."""
        await self.succession.replace(config, spec)
        self.slots.total_tokens = config.limits.max_workers
        self._report_slots()
        self.unavailable = unavailable

    @property
    def spec(self) -> JailSpec:
        return self.generation.spec

    @property
    def pools(self) -> dict[PoolKey, Pool]:
        return self.generation.pools

    def start_soon(self, task: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a task in the dispatcher's nursery (tidying up after a request)."""
        assert self._nursery is not None, "start() first"
        self._nursery.start_soon(task, *args)

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
        """The ready-workers gauge of a language: its runtimes' pools, with and without network."""
        ready = sum(p.ready for p in self.pools.values() if p.language == language)
        self.metrics.set_ready_workers(language, ready)

    async def dependencies(self, language: Language) -> list[Dependency]:
        """What the serving jail holds (after a CLI sync, the new env serves only on reload)."""
        runtime = registry.deps_of(language)
        if runtime is None or runtime.deps is None:
            return []
        jail = self.spec.runtimes.get(runtime.name)
        bound = jail.environment if jail is not None else None
        return await trio.to_thread.run_sync(runtime.deps().installed, bound)

    async def sync_dependencies(self, language: Language) -> None:
        """Rebuild the environment from its requirements, then switch pools onto it.

        A failed sync leaves the live environment (and every pool) as it was.
        """
        config = self.config
        runtime = registry.deps_of(language)
        if runtime is None or runtime.deps is None:
            return  # no environment of its own: nothing to sync
        try:
            await trio.to_thread.run_sync(
                runtime.deps().sync, config.deps, config.server.state_dir, False, None, False
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

    async def wait_idle(self) -> None:
        """Until no request is admitted."""
        await self.admission.wait_idle()

    def _pool_key(self, job: Job) -> PoolKey | None:
        """The pool of the runtime that serves the job (registry.choose), or None."""
        sources = (job.preload, job.code)
        name = registry.choose(job.language, sources, self.generation.spec)
        return (name, job.network) if name is not None else None

    async def run(self, job: Job, request_id: RequestId) -> RunResult:
        plain = registry.plain(job.language)
        if plain is not None and plain.name in self.unavailable:
            raise ProtocolError("unsupported_language", self.unavailable[plain.name])
        key = self._pool_key(job)
        pool = self.generation.pool_for(key) if key is not None else None
        if pool is None:
            raise ProtocolError("unsupported_language", f"{job.language} is not served here")
        self.admission.admit()
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
            self.admission.leave()
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
                try:
                    # A free slot is taken without a trip through the scheduler.
                    self.slots.acquire_nowait()
                except trio.WouldBlock:
                    await self.slots.acquire()
                holding = True
                self._report_slots()
                while worker is None:
                    try:
                        worker = await pool.take()
                    except PoolRetired:
                        healing = self.generation.dead
                        key = self._pool_key(job) or (pool.runtime, pool.network)
                        pool = await self.succession.serving_pool(key)
                        healing = False
            self.metrics.observe_queue_wait(job.language, trio.current_time() - started)
            if worker is None and healing:
                raise ProtocolError(
                    "overloaded",
                    f"the {job.language} workers are being restarted after a fault; "
                    "retry in a few seconds",
                )
            if worker is None:
                waited_ms = (trio.current_time() - started) * 1000
                return verdict.queued_too_long(request_id, waited_ms, job.timeout)
            limits = verdict.limits_of(
                job.timeout, job.memory_mb, self.config.limits, worker.cgroup is not None
            )
            prepared = verdict.default_limits(self.config.limits)
            try:
                if worker.cgroup is not None and limits.memory_bytes != prepared.memory_bytes:
                    try:
                        worker.cgroup.set_memory_limit(limits.memory_bytes)
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
                    limits.output_bytes,
                    limits.rlimit_memory_mb,
                )
            except BaseException:
                with trio.CancelScope(shield=True):
                    await pool.generation.retire_worker(worker, pool)
                raise
            # The run is over (the daemon reaped it): answer now, tidy up after.
            self.start_soon(self._retire_after_answer, worker, pool)
        finally:
            if holding:
                self.slots.release()
                self._report_slots()
        if result.status == "blocked_syscall" and worker.pid is not None:
            call = await self.seccomp_log.syscall_of(worker.pid)
            result = verdict.with_blocked_call(result, call.describe() if call else None)
        return result

    async def _retire_after_answer(self, worker: WorkerHandle, pool: Pool) -> None:
        """Retire a worker whose run is over, once its answer is out. This task starts
        in the same scheduling batch as the front end's sender the answer wakes; one
        checkpoint first lets that sender write it before the worker's cgroups are
        removed (an rmdir in the event loop that took up to 10 ms, measured). Shielded,
        as retire_worker is: a worker must be retired even at stop."""
        await trio.lowlevel.cancel_shielded_checkpoint()
        await pool.generation.retire_worker(worker, pool)
