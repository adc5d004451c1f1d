"""A job is a request after validation and capping: what a worker is told to run.

Both front ends (the native protocol and the dify-sandbox API) turn their input
into a Job with the rules here (capped_timeout, capped_memory, network_of), so
limits are capped in one place and no request field reaches
a setting the config does not expose to requests (invariant 13).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from sandboxd import inputfiles
from sandboxd.config import Config
from sandboxd.protocol import Language, ProtocolError, RequestId, RunRequest, RunResult


class Job(msgspec.Struct, frozen=True):
    language: Language
    code: str
    # Seconds of wall clock for the whole request, queue wait included.
    timeout: float
    memory_mb: int
    # Whether the run gets egress (only ever true when [network] mode = "allow").
    network: bool = False
    stdin: str = ""
    # Code run in the jail right before `code` (dify-sandbox's preload), "" for none.
    preload: str = ""
    # Files written into the run's working directory first (inputfiles.py checked them).
    files: dict[str, bytes] = {}


class Dependency(msgspec.Struct, frozen=True):
    name: str
    version: str


class Service(Protocol):
    """What the front ends need from the daemon's core."""

    async def run(self, job: Job, request_id: RequestId) -> RunResult:
        """Run a job; raises ProtocolError (overloaded, unsupported_language, internal)."""
        ...

    async def dependencies(self, language: Language) -> list[Dependency]:
        """The packages importable in that language's jail, with real versions."""
        ...

    async def sync_dependencies(self, language: Language) -> None:
        """Rebuild that language's environment from its requirements; ProtocolError on failure."""
        ...

    def why_unavailable(self) -> str | None:
        """Why a run cannot be taken now (stopping, no pool serving), or None when it can."""
        ...


def capped_timeout(requested: float | None, config: Config) -> float:
    if requested is None:
        return config.limits.timeout
    return min(requested, config.limits.max_timeout)


def capped_memory(requested: int | None, config: Config) -> int:
    if requested is None:
        return config.limits.memory_mb
    return min(requested, config.limits.max_memory_mb)


NETWORK_DISABLED = "network is disabled, please enable it in the configuration"


def network_of(wanted: bool, config: Config) -> bool:
    """Whether a run that asked for network (or not) gets it: only in "allow" mode; in
    "reject" mode asking is refused (dify-sandbox's behaviour), ProtocolError(bad_request)."""
    if wanted and config.network.mode == "reject":
        raise ProtocolError("bad_request", NETWORK_DISABLED)
    return wanted and config.network.mode == "allow"


def job_from_request(request: RunRequest, config: Config) -> Job:
    """The native request as a job; enable_network per network_of()."""
    network = network_of(request.enable_network, config)
    language: Language = "nodejs" if request.language == "nodejs" else "python3"
    if request.files and language != "python3":
        raise ProtocolError("bad_request", "files: only python3 runs take files")
    return Job(
        language=language,
        code=request.code,
        timeout=capped_timeout(request.timeout, config),
        memory_mb=capped_memory(request.memory_mb, config),
        network=network,
        stdin=request.stdin,
        files=inputfiles.decode(request.files),
    )
