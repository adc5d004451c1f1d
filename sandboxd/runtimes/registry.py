"""The registry: every runtime the daemon serves, in one table read top to bottom.

A runtime is added with one file, runtimes/<name>.py declaring its RUNTIME record
(runtimes/__init__.py: Runtime), and one line in RUNTIMES below (or register() before
the daemon starts). Order matters twice: a record's jail() sees the runtimes built
before it, and a job goes to the first runtime of its language that claims it, else
to the language's plain runtime (the one whose record has no `claims`).
"""

from __future__ import annotations

from collections.abc import Iterator

from sandboxd.jail import JailSpec
from sandboxd.runtimes import Runtime, datascience, nodejs, python3

RUNTIMES: list[Runtime] = [
    python3.RUNTIME,
    datascience.RUNTIME,  # python3 jobs that import its warm modules
    nodejs.RUNTIME,
]


def register(runtime: Runtime) -> None:
    """Add a runtime to the table (before the daemon builds its first jail spec)."""
    if any(known.name == runtime.name for known in RUNTIMES):
        raise ValueError(f"a runtime named {runtime.name!r} is registered already")
    RUNTIMES.append(runtime)


def named(name: str) -> Runtime:
    for runtime in RUNTIMES:
        if runtime.name == name:
            return runtime
    raise KeyError(name)


def plain(language: str) -> Runtime | None:
    """The runtime that serves every job of `language` no other runtime claims."""
    return next((r for r in RUNTIMES if r.language == language and r.claims is None), None)


def choose(language: str, sources: tuple[str, ...], spec: JailSpec) -> str | None:
    """The name of the runtime of `spec` that serves a job: the first of its language
    that claims it, else the plain one (None: the language has none)."""
    for runtime in RUNTIMES:
        jail = spec.runtimes.get(runtime.name)
        claims = runtime.claims if runtime.language == language else None
        if claims is not None and jail is not None and claims(sources, jail):
            return runtime.name
    found = plain(language)
    return found.name if found is not None else None


def with_deps() -> Iterator[Runtime]:
    """The runtimes that have a dependency environment of their own."""
    return (runtime for runtime in RUNTIMES if runtime.deps is not None)


def deps_of(language: str) -> Runtime | None:
    """The runtime whose dependency environment serves `language` (the Dify routes)."""
    return next((r for r in with_deps() if r.language == language), None)
