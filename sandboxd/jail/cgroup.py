"""Per-run cgroups: limits the kernel enforces and verdicts the kernel reports.

Each worker gets a leaf cgroup of its own while it is pre-forked (off the request
path); the zygote writes the worker into it before the worker prepares its jail,
so every process of the run is counted. After the run the daemon reads the
kernel's counters (OOM kills, pids.max hits, CPU, peak memory) and removes it.

Two layouts, one interface:
- unified (cgroup v2): a delegated directory (a systemd scope with Delegate=yes,
  see scope.py) with one child per worker: memory.max, memory.swap.max=0, pids.max,
  cpu.max; memory.events, pids.events, cpu.stat, memory.peak.
- legacy (cgroup v1, e.g. hosts with the hybrid layout and no systemd PID 1):
  one directory per worker in the memory and pids hierarchies, and in cpu for a quota.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Protocol

from sandboxd.jail.liveness import daemon_alive

log = logging.getLogger("sandboxd.cgroup")

V1_ROOT = "/sys/fs/cgroup"
CPU_PERIOD_US = 100_000
CONTROLLERS_V1 = ("memory", "pids", "cpu")


@dataclass(frozen=True)
class Usage:
    oom_kills: int
    pids_max_hits: int
    # None where the layout does not count CPU per run (then rusage is used).
    cpu_usec: int | None
    peak_memory_bytes: int | None


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    tasks: int
    # Percent of one CPU; 0 for no quota.
    cpu_percent: int


class RunCgroup(Protocol):
    @property
    def procs_files(self) -> list[str]: ...

    def set_memory_limit(self, memory_bytes: int) -> None: ...

    def usage(self) -> Usage: ...

    def kill_all(self) -> bool:
        """SIGKILL every process left in the run's cgroup; True once it is empty."""
        ...

    def remove(self) -> None: ...


class Backend(Protocol):
    name: str

    def create(self, name: str, limits: Limits) -> RunCgroup: ...

    def close(self) -> None:
        """Remove what the backend made (its runs' cgroups are gone by then)."""
        ...


def _write(path: str, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


# Counter files are a few lines; one read of this much takes each whole.
_COUNTERS_MAX = 8192


def _read_small(path: str) -> str | None:
    """A small cgroup file in one read: open, read, close (three system calls, where a
    Python file object adds fstat, ioctl, lseek and an end-of-file read); None if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, _COUNTERS_MAX).decode()
    finally:
        os.close(fd)


def _read_keyed(path: str) -> dict[str, int]:
    """A flat keyed file (memory.events, cpu.stat, memory.oom_control) as a dict."""
    values: dict[str, int] = {}
    for line in (_read_small(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def _read_int(path: str) -> int | None:
    try:
        return int((_read_small(path) or "").strip())
    except ValueError:
        return None


def _procs(path: str) -> list[int]:
    try:
        with open(f"{path}/cgroup.procs") as handle:
            return [int(line) for line in handle if line.strip()]
    except FileNotFoundError:
        return []


def kill_members(path: str) -> bool:
    """SIGKILL each process of the cgroup at `path` through a pidfd opened while it was
    still a member (so a recycled pid is never hit); True when none was left."""
    members = _procs(path)
    relative = path.removeprefix(V1_ROOT).split("/", 2)[-1]
    for pid in members:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue  # exited meanwhile
        try:
            with open(f"/proc/{pid}/cgroup") as handle:
                if any(line.rstrip("\n").endswith("/" + relative) for line in handle):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass  # exited meanwhile
        finally:
            os.close(pidfd)
    return not members


def remove_if_empty(cgroup: RunCgroup) -> bool:
    """Kill what is left in a run's cgroup and try once to remove it; True if it is gone.
    After its worker was reaped it usually is at once (its pid namespace died with it),
    so the daemon tries this before waiting in a thread (remove_when_empty)."""
    dirs = [os.path.dirname(path) for path in cgroup.procs_files]
    if cgroup.kill_all():
        # A v1 cgroup can stay busy for a moment after its last process is gone.
        for directory in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        return not any(os.path.exists(directory) for directory in dirs)
    return False


def remove_when_empty(cgroup: RunCgroup, grace: float) -> bool:
    """Kill what is left in a run's cgroup, then remove it; False (and the cgroup kept)
    if it is still busy after `grace` seconds. Blocking."""
    deadline = time.monotonic() + grace
    while True:
        if remove_if_empty(cgroup):
            return True
        if time.monotonic() > deadline:
            dirs = [os.path.dirname(path) for path in cgroup.procs_files]
            log.error("cannot remove cgroups %s: still busy after %g s", dirs, grace)
            return False
        time.sleep(0.01)


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as error:  # EBUSY: a process is still inside; never fatal
        log.error("cannot remove cgroup %s: %s", path, error)


class UnifiedCgroup:
    def __init__(self, path: str, limits: Limits) -> None:
        self.path = path
        os.mkdir(path)
        self.set_memory_limit(limits.memory_bytes)
        _write(f"{path}/memory.swap.max", "0")
        _write(f"{path}/pids.max", str(limits.tasks))
        if limits.cpu_percent:
            _write(
                f"{path}/cpu.max", f"{limits.cpu_percent * CPU_PERIOD_US // 100} {CPU_PERIOD_US}"
            )

    @property
    def procs_files(self) -> list[str]:
        return [f"{self.path}/cgroup.procs"]

    def set_memory_limit(self, memory_bytes: int) -> None:
        _write(f"{self.path}/memory.max", str(memory_bytes))

    def usage(self) -> Usage:
        return Usage(
            oom_kills=_read_keyed(f"{self.path}/memory.events").get("oom_kill", 0),
            pids_max_hits=_read_keyed(f"{self.path}/pids.events").get("max", 0),
            cpu_usec=_read_keyed(f"{self.path}/cpu.stat").get("usage_usec", 0),
            peak_memory_bytes=_read_int(f"{self.path}/memory.peak"),
        )

    def kill_all(self) -> bool:
        if not _procs(self.path):
            return True
        if os.path.exists(f"{self.path}/cgroup.kill"):
            _write(f"{self.path}/cgroup.kill", "1")
            return False
        return kill_members(self.path)

    def remove(self) -> None:
        if os.path.exists(f"{self.path}/cgroup.kill"):
            _write(f"{self.path}/cgroup.kill", "1")
        _rmdir(self.path)


class UnifiedBackend:
    """Children of a delegated cgroup v2 directory."""

    name = "cgroup2"

    def __init__(self, parent: str) -> None:
        self.parent = parent

    def create(self, name: str, limits: Limits) -> RunCgroup:
        return UnifiedCgroup(os.path.join(self.parent, name), limits)

    def close(self) -> None:
        pass  # the parent belongs to systemd (a delegated scope or service)


# Whether the kernel accounts swap in v1 memory cgroups (memory.memsw.*), once.
_SWAP_ACCOUNTING = os.path.exists(f"{V1_ROOT}/memory/memory.memsw.limit_in_bytes")


class LegacyCgroup:
    """Each v1 directory costs a mkdir and an rmdir per run (a fraction of a millisecond
    each, measured), so only memory and pids always; cpu only for a quota. CPU time comes
    from the daemon's wait4 rusage (Usage.cpu_usec is None)."""

    def __init__(self, parent: str, name: str, limits: Limits) -> None:
        self.memory = f"{V1_ROOT}/memory/{parent}/{name}"
        self.pids = f"{V1_ROOT}/pids/{parent}/{name}"
        self.cpu = f"{V1_ROOT}/cpu/{parent}/{name}" if limits.cpu_percent else None
        # memory.swappiness 0 is inherited from the parent (LegacyBackend) at mkdir.
        for path in self._dirs:
            os.mkdir(path)
        # A new cgroup's limits are unlimited: this lowers them (memory first).
        self._write_memory_limit(limits.memory_bytes, raising=False)
        _write(f"{self.pids}/pids.max", str(limits.tasks))
        if self.cpu is not None:
            _write(f"{self.cpu}/cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(f"{self.cpu}/cpu.cfs_quota_us", str(limits.cpu_percent * CPU_PERIOD_US // 100))

    @property
    def _dirs(self) -> tuple[str, ...]:
        return (self.memory, self.pids) + ((self.cpu,) if self.cpu is not None else ())

    @property
    def procs_files(self) -> list[str]:
        return [f"{path}/cgroup.procs" for path in self._dirs]

    def set_memory_limit(self, memory_bytes: int) -> None:
        current = _read_int(f"{self.memory}/memory.limit_in_bytes") or 0
        self._write_memory_limit(memory_bytes, raising=memory_bytes > current)

    def _write_memory_limit(self, memory_bytes: int, raising: bool) -> None:
        memory = f"{self.memory}/memory.limit_in_bytes"
        # With swap accounting, memory+swap equal to memory means no swap at all. The kernel
        # keeps memory <= memory+swap at every step, so the order depends on the direction.
        order = [memory]
        if _SWAP_ACCOUNTING:
            memsw = f"{self.memory}/memory.memsw.limit_in_bytes"
            order = [memsw, memory] if raising else [memory, memsw]
        for path in order:
            _write(path, str(memory_bytes))

    def usage(self) -> Usage:
        return Usage(
            oom_kills=_read_keyed(f"{self.memory}/memory.oom_control").get("oom_kill", 0),
            pids_max_hits=_read_keyed(f"{self.pids}/pids.events").get("max", 0),
            cpu_usec=None,
            peak_memory_bytes=_read_int(f"{self.memory}/memory.max_usage_in_bytes"),
        )

    def kill_all(self) -> bool:
        # Every process of the run is in the pids hierarchy (the zygote put it there).
        return kill_members(self.pids)

    def remove(self) -> None:
        for path in self._dirs:
            _rmdir(path)


class LegacyBackend:
    """Per-run directories in the v1 memory, pids and cpu hierarchies (CONTROLLERS_V1)."""

    name = "cgroup1"

    def __init__(self, parent: str) -> None:
        self.parent = parent
        for controller in CONTROLLERS_V1:
            os.makedirs(f"{V1_ROOT}/{controller}/{parent}", exist_ok=True)
        # Inherited by each run's cgroup when it is made, instead of a write per run.
        _write(f"{V1_ROOT}/memory/{parent}/memory.swappiness", "0")

    def create(self, name: str, limits: Limits) -> RunCgroup:
        return LegacyCgroup(self.parent, name, limits)

    def close(self) -> None:
        for controller in CONTROLLERS_V1:
            _rmdir(f"{V1_ROOT}/{controller}/{self.parent}")


# Seconds a dead daemon's processes get to leave its cgroups (its workers die with it,
# by their parent-death signal; the zygote exits when its control socket hangs up).
STALE_GRACE = 5.0


def remove_tree(path: str, grace: float = STALE_GRACE) -> bool:
    """Kill what is left in a cgroup tree and remove it, deepest first; True when gone."""
    deadline = time.monotonic() + grace
    while True:
        dirs = [root for root, _, _ in os.walk(path, topdown=False)]
        empty = all([kill_members(d) for d in dirs])
        if empty:
            for directory in dirs:
                _rmdir(directory)
            if not os.path.exists(path):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def remove_stale_legacy() -> list[str]:
    """Remove the v1 cgroups (`sandboxd.<pid>` in each hierarchy) of dead daemons."""
    removed: list[str] = []
    for controller in CONTROLLERS_V1:
        top = f"{V1_ROOT}/{controller}"
        if not os.path.isdir(top):
            continue
        for name in sorted(os.listdir(top)):
            found = re.fullmatch(r"sandboxd\.([0-9]+)", name)
            if found and not daemon_alive(int(found[1])):
                if remove_tree(f"{top}/{name}"):
                    removed.append(f"{top}/{name}")
                else:
                    log.error("cannot remove the stale cgroup %s/%s", top, name)
    return removed


def legacy_available() -> bool:
    """True when the v1 memory, pids and cpu hierarchies are mounted and writable."""
    return all(
        os.access(f"{V1_ROOT}/{controller}/cgroup.procs", os.W_OK) for controller in CONTROLLERS_V1
    )
