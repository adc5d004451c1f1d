"""Runtimes: how a jailed worker of each language receives and runs its one job.

A runtime module offers three verbs, called in the worker (and the zygote):
root_files(spec) -> extra files for the language's root, built once by the zygote;
prepare(spec) -> last steps before seccomp (e.g. sys.path, environment);
start(spec, ready_fd) -> report ready on ready_fd, read the job from fd 0, run it, exit.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NoReturn, Protocol, cast

from sandboxd.jail import JailSpec


class Runtime(Protocol):
    def root_files(self, spec: JailSpec) -> dict[str, bytes]: ...

    def prepare(self, spec: JailSpec) -> None: ...

    def start(self, spec: JailSpec, ready_fd: int) -> NoReturn: ...


def get(language: str) -> Runtime:
    """The runtime module of a language (imported on first use: the zygote loads both)."""
    module: ModuleType = importlib.import_module(f"sandboxd.runtimes.{language}")
    return cast(Runtime, module)
