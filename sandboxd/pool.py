"""A pool: the ready workers of one (runtime, network), from one generation.

Theory of operation
-------------------
A Pool keeps `size` workers ready or preparing; a task per worker waits for its
readiness report before the worker is offered, so a request never pays for jail
setup. A taken worker's replacement is ordered when its run is over (at once if
the pool ran dry), so preparing it does not compete with the run; a ready worker
that dies while it waits (killed from outside) is reaped and replaced within
SWEEP_EVERY. Its workers
come from its generation (generation.py: Generation.new_worker) and go back to
it to be retired (Generation.retire_worker). A pool whose workers keep failing to
start (FAILING_AFTER in a row) answers `internal` at once instead of waiting.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from sandboxd.protocol import Language, ProtocolError
from sandboxd.worker import WorkerHandle

if TYPE_CHECKING:
    from sandboxd.generation import Generation

log = logging.getLogger("sandboxd.pool")

# A pool per runtime (runtimes/registry.py), and per whether its workers have network.
PoolKey = tuple[str, bool]

# Consecutive spawn failures after which requests fail fast instead of waiting.
FAILING_AFTER = 3
READY_TIMEOUT = 30.0
# How often the ready workers are checked for having died while they waited (killed
# from outside, e.g. by the OOM killer): a dead one is reaped, which frees its uid
# and cgroup, and replaced, instead of waiting as a zombie until a run takes it.
SWEEP_EVERY = 1.0


class PoolRetired(Exception):
    """The pool's generation was replaced while a request waited for one of its workers."""


class Pool:
    """Ready workers of one runtime, all forked by one generation's zygote."""

    def __init__(
        self,
        generation: Generation,
        runtime: str,
        language: Language,
        size: int,
        network: bool = False,
    ) -> None:
        self.generation = generation
        # The runtime its workers run (a JailSpec.runtimes key), and its wire language.
        self.runtime = runtime
        self.language = language
        # Whether its workers live in the egress network namespace.
        self.network = network
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
                with trio.move_on_after(SWEEP_EVERY):
                    await self._wanted.wait()
                    self._wanted = trio.Event()
                self._sweep()

    def _sweep(self) -> None:
        """Retire the ready workers that died while they waited. No checkpoint between
        taking them out and putting the live ones back: no take() runs in between."""
        alive: list[WorkerHandle] = []
        dead = 0
        while True:
            try:
                worker = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if worker.gone():
                dead += 1
                self.generation.shared.start_soon(self.generation.retire_worker, worker, self)
            else:
                alive.append(worker)
        for worker in alive:
            self._send.send_nowait(worker)
        if dead:
            log.warning("%d ready %s worker(s) died while waiting", dead, self.language)
            self.generation.ready_changed(self.language)

    async def _prepare_one(self) -> None:
        worker: WorkerHandle | None = None
        offered = False
        try:
            worker = await self.generation.new_worker(self.runtime, self.language, self.network)
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
            self.generation.shared.metrics.spawn_failed(self.language)
            log.error("%s worker failed to start: %s", self.language, exc)
            # Back off so a broken jail does not spin the zygote.
            await trio.sleep(min(5.0, 0.05 * 2 ** min(self.failures, 7)))
        finally:
            if worker is not None and not offered:
                with trio.CancelScope(shield=True):
                    await self.generation.retire_worker(worker)
            self.preparing -= 1
            self._wanted.set()
            self.generation.ready_changed(self.language)

    async def drain(self) -> None:
        """Close the pool and retire every ready worker (its refill task is cancelled first).
        Requests waiting in take() get PoolRetired and go to the current generation."""
        self._send.close()
        while True:
            try:
                worker = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            await self.generation.retire_worker(worker)

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
            self.generation.shared.start_soon(self.generation.retire_worker, worker, self)
        # The replacement is ordered once this run is over (refill()), so that preparing
        # it does not compete with the run for CPU; only an empty pool refills at once.
        if self.ready == 0:
            self.refill_soon()
        self.generation.ready_changed(self.language)
        return worker

    def refill_soon(self) -> None:
        self._wanted.set()

    @property
    def serving(self) -> bool:
        """Whether a run can get a worker here: one is ready, or starting them works."""
        return self.ready > 0 or self.failures < FAILING_AFTER
