"""Which generation serves: the first one, a reload's or dependency switch's
replacement, and the healing of one whose zygote died.

Theory of operation
-------------------
Succession.replace starts a new generation (generation.py) and, once it is warm,
serves from it and retires the old one, whose runs in flight finish on it.
Faults heal (Succession._heal): a generation whose zygote died (its pidfd, watched
by the generation) calls generation_died, and a new generation with the same spec
is started without a reload, backing off while new ones keep failing. Workers are the
daemon's children, not the zygote's (zygote.py clones them with CLONE_PARENT),
so runs already on workers finish, and ready workers are retired (killed
through their pidfds and reaped), which frees their uids and cgroups. Requests
waiting meanwhile move to the new generation (serving_pool), or get `overloaded`
when none is up before their deadline (dispatcher.py).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import trio

from sandboxd.config import Config
from sandboxd.generation import Generation, GenerationFailed, Shared
from sandboxd.jail import JailSpec
from sandboxd.jail.identity import UidPool
from sandboxd.jail.scope import Placement
from sandboxd.metrics import Metrics
from sandboxd.pool import Pool, PoolKey
from sandboxd.protocol import Language, ProtocolError

log = logging.getLogger("sandboxd.succession")

# Pause before healing a dead generation: doubled while new generations keep dying
# within HEAL_RESET seconds of their start, so a broken zygote does not spin.
HEAL_BACKOFF_MIN = 0.05
HEAL_BACKOFF_MAX = 5.0
HEAL_RESET = 30.0
# While a dead generation is being replaced the daemon counts as healthy (systemd's
# watchdog is kept fed) for this long; past it, the watchdog is the last resort.
HEAL_WATCHDOG_GRACE = 120.0


class Succession:
    """The serving generation, and the start, switch and healing of the next."""

    def __init__(
        self,
        config: Config,
        spec: JailSpec,
        placement: Placement | None,
        metrics: Metrics,
        start_soon: Callable[..., None],
        ready_changed: Callable[[Language], None],
        stopping: Callable[[], bool],
    ) -> None:
        # The running config: the next generation's pool sizes and run limits.
        self.config = config
        self._start_soon = start_soon
        self._stopping = stopping
        self._shared = Shared(
            uids=UidPool(config.jail.uid_min, config.jail.uid_max),
            placement=placement,
            metrics=metrics,
            ids=itertools.count(1),
            start_soon=start_soon,
            ready_changed=ready_changed,
            on_death=self.generation_died,
        )
        self._numbers = itertools.count(1)
        self.generation = self._new_generation(spec)
        self._nursery: trio.Nursery | None = None
        self._replacing = trio.Lock()
        # Set (and renewed) each time a new generation starts serving.
        self._switched = trio.Event()
        self._heal_backoff = 0.0
        # Generations started in place of one whose zygote died.
        self.heals = 0
        # When the serving generation's zygote died (None while it is alive).
        self._dead_since: float | None = None

    def _new_generation(self, spec: JailSpec) -> Generation:
        return Generation(self._shared, spec, self.config, next(self._numbers))

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

    async def _start_generation(self, spec: JailSpec, warm: bool = True) -> Generation:
        """A new generation (warm, or with its zygote up); GenerationFailed (with nothing
        left running) if not."""
        assert self._nursery is not None, "start() first"
        fresh = self._new_generation(spec)
        try:
            await self._nursery.start(fresh.run, warm)
        except GenerationFailed:
            await fresh.retire()
            raise
        if fresh.dead:  # died right after warming up (and is being retired)
            raise GenerationFailed("the zygote died as its generation started")
        return fresh

    def healthy(self) -> bool:
        """Whether systemd's watchdog should be fed: some pool of the serving generation
        can take runs (what GET /health says too), or a dead generation is being replaced
        (for a while). One language whose workers fail to start (node slower than
        READY_TIMEOUT under emulation, say) must not get the others restarted with it."""
        if self._dead_since is not None:
            return trio.current_time() - self._dead_since < HEAL_WATCHDOG_GRACE
        return any(p.serving for p in self.generation.pools.values())

    def _serve_from(self, fresh: Generation) -> Generation:
        old, self.generation = self.generation, fresh
        self._dead_since = None
        self._switched.set()
        self._switched = trio.Event()
        return old

    async def replace(self, config: Config, spec: JailSpec) -> None:
        """Serve from a new generation once it is warm; runs in flight finish on the old.
        Raises GenerationFailed (the old generation goes on serving) if it cannot start."""
        async with self._replacing:
            running, self.config = self.config, config  # the new pools' sizes and limits
            try:
                fresh = await self._start_generation(spec)
            except GenerationFailed:
                self.config = running
                raise
            self._start_soon(self._serve_from(fresh).retire)

    def generation_died(self, dead: Generation) -> None:
        """Called by a generation whose zygote died: retire it, and heal if it served."""
        self._start_soon(dead.retire)
        if dead is self.generation and not self._stopping():
            self._dead_since = trio.current_time()
            self._start_soon(self._heal, dead)

    async def _heal(self, dead: Generation) -> None:
        """Replace a dead generation by one with the same spec, backing off on failure."""
        async with self._replacing:
            if trio.current_time() - dead.started_at > HEAL_RESET:
                self._heal_backoff = 0.0
            while dead is self.generation and not self._stopping():
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

    async def serving_pool(self, key: PoolKey) -> Pool:
        """The current generation's pool for `key`, once the generation is alive."""
        while self.generation.dead:
            await self._switched.wait()
        pool = self.generation.pool_for(key)
        if pool is None:
            raise ProtocolError("unsupported_language", f"{key[0]} is not served here")
        return pool
