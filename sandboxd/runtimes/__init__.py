"""Runtimes: one home per runtime, and the record that says everything about it.

Each runtimes/<name>.py declares one Runtime record (its RUNTIME); registry.py lists
them in one table, and the daemon loops over that table and names no language.
A record's jail() turns the config into a RuntimeJail (jail/__init__.py): plain
data in the JailSpec, so the zygote (started `python -I -S`) needs nothing of the
registry, only the runner module the record names.

A runner module offers four verbs, called in the zygote and in the worker:
root_files(spec, runtime) -> extra files of the runtime's root, built once by the zygote;
before_forks(spec, runtime) -> work done once in the zygote (and in a template after its
warm imports) right before it forks workers, so that no worker repeats it;
prepare(spec, runtime) -> last steps before seccomp (e.g. sys.path, environment);
start(spec, runtime, ready_fd) -> report ready on ready_fd, read the job from fd 0,
run it, exit.

Nothing here imports the daemon's side (config, deps): records name their functions,
and those import what they need when the daemon calls them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, NoReturn, Protocol, cast

from sandboxd.jail import JailSpec, RuntimeJail

if TYPE_CHECKING:
    from sandboxd.config import Config, DepsConfig
    from sandboxd.jobs import Dependency
    from sandboxd.protocol import Language


class Runner(Protocol):
    def root_files(self, spec: JailSpec, runtime: RuntimeJail) -> dict[str, bytes]: ...

    def before_forks(self, spec: JailSpec, runtime: RuntimeJail) -> None: ...

    def prepare(self, spec: JailSpec, runtime: RuntimeJail) -> None: ...

    def start(self, spec: JailSpec, runtime: RuntimeJail, ready_fd: int) -> NoReturn: ...


def get(runner: str) -> Runner:
    """A runner module by name (imported on first use, in the zygote)."""
    module: ModuleType = importlib.import_module(f"sandboxd.runtimes.{runner}")
    return cast(Runner, module)


@dataclass(frozen=True)
class DepsLayout:
    """A runtime's dependency environment under [server] state_dir (deps.py)."""

    # Directory under the state dir ("python": <state>/python/current, envs/...).
    directory: str
    # Its source file ([deps] python_requirements, say).
    source: Callable[[DepsConfig], str]
    # Build a new environment from the source and make it live; the live directory.
    # (deps config, state dir, offline, wheelhouse, force)
    sync: Callable[[DepsConfig, str, bool, str | None, bool], str]
    # The live directory the jail binds (real path), from the state dir; None: none.
    live: Callable[[str], str | None]
    # What such a directory holds (None: nothing installed).
    installed: Callable[[str | None], list[Dependency]]
    # A host program the sync needs; `deps sync` of every runtime skips it when absent.
    tool: str = ""


# What a record's jail() returns: its part of the spec, None when it is not served
# with this config (no pool, no warning), or the reason it cannot be served.
JailBuilder = Callable[["Config", Mapping[str, RuntimeJail]], "RuntimeJail | str | None"]


@dataclass(frozen=True)
class Runtime:
    """Everything about one runtime: the table in registry.py holds one per module."""

    # Its name: of its pools, its JailSpec entry and (unless shared) its jail root.
    name: str
    # The wire language whose jobs it serves (protocol.Language).
    language: Language
    # Module under sandboxd.runtimes that runs one job in the jail (a Runner).
    runner: str
    # Its seccomp policy, by name (jail/seccomp.py POLICIES).
    seccomp_policy: str
    # The config section of its pool_size and extra_syscalls (a section of config.Config).
    section: str
    # Its part of the jail spec from the config and the runtimes built before it.
    jail: JailBuilder
    # Its pools are its section's pool_size divided by this (at least one worker).
    pool_divisor: int = 1
    # Whether a job of its language is for it, by a cheap scan of (preload, code);
    # None: the language's plain runtime, which serves every job no other one claims.
    claims: Callable[[tuple[str, ...], RuntimeJail], bool] | None = None
    # Whether the config can give it pools at all (the uid-pool check counts those).
    enabled: Callable[[Config], bool] = lambda config: True
    # Its dependency environment, built on demand in the daemon (None: none of its own).
    deps: Callable[[], DepsLayout] | None = None
