"""Resource limits (setrlimit): a table of what each limit is derived from.

The worker sets the config's maxima while it is prepared (still root), then
lowers them to the job's values once the job arrives (lowering needs no privilege).
"""

from __future__ import annotations

import math
import resource
from collections.abc import Callable

from sandboxd.jail import JailSpec

MIB = 1024 * 1024

# rlimit -> (soft, hard) from the spec. Memory is RLIMIT_DATA: it counts private
# writable memory (heap, anonymous mmaps, thread stacks) but not address space merely
# reserved, so thread-heavy runtimes are not starved the way RLIMIT_AS would starve them.
LIMITS: dict[int, Callable[[JailSpec], tuple[int, int]]] = {
    resource.RLIMIT_DATA: lambda s: (s.max_memory_mb * MIB, s.max_memory_mb * MIB),
    # SIGXCPU at the soft limit is ignored by a pid-namespace init; the hard one kills.
    resource.RLIMIT_CPU: lambda s: (s.max_cpu_seconds, s.max_cpu_seconds + 1),
    # Per uid, and every worker has its own uid: this bounds one run's processes.
    resource.RLIMIT_NPROC: lambda s: (s.tasks, s.tasks),
    resource.RLIMIT_FSIZE: lambda s: (s.file_size_mb * MIB, s.file_size_mb * MIB),
    resource.RLIMIT_NOFILE: lambda s: (s.open_files, s.open_files),
    resource.RLIMIT_CORE: lambda s: (0, 0),
    resource.RLIMIT_MEMLOCK: lambda s: (0, 0),
    resource.RLIMIT_MSGQUEUE: lambda s: (0, 0),
}


def cpu_seconds(timeout: float) -> int:
    """The RLIMIT_CPU soft limit of a run with this timeout (whole seconds, at least 1);
    a run killed at it is judged a timeout (verdict.py)."""
    return max(1, math.ceil(timeout))


def apply(spec: JailSpec) -> None:
    for which, derive in LIMITS.items():
        resource.setrlimit(which, derive(spec))


def lower_for_job(memory_mb: int, timeout: float) -> None:
    """Tighten memory (unless 0: cgroups enforce it) and CPU to the job's own limits."""
    cpu = cpu_seconds(timeout)
    limits = {resource.RLIMIT_CPU: (cpu, cpu + 1)}
    if memory_mb:
        limits[resource.RLIMIT_DATA] = (memory_mb * MIB, memory_mb * MIB)
    for which, (soft, hard) in limits.items():
        old_soft, old_hard = resource.getrlimit(which)
        resource.setrlimit(which, (min(soft, old_soft), min(hard, old_hard)))
