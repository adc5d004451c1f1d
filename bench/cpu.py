"""Where the daemon's CPU goes, by role, from the kernel's own counters.

The bench starts the daemon inside a v1 cpuacct cgroup of its own (the "tree"
cgroup). sandboxd moves its workers into per-run cgroups of the memory, pids
(and, for a quota, cpu) hierarchies only, never of cpuacct, so the tree
cgroup's `cpuacct.usage` counts, to the nanosecond, every process the daemon
ever started, dead ones included. Around each cell the bench snapshots:

- the tree's `cpuacct.usage`;
- the daemon's utime+stime (`/proc/PID/stat`, all threads, dead ones included)
  and the run time of each other live process of the tree (schedstat, to the
  nanosecond: a zygote forks in well under a clock tick per run); those alive at
  both ends of a cell are the zygotes and templates;
- each ready worker's run time (schedstat): the members of the leaf cgroups under
  `pids/sandboxd.DAEMONPID/` (the zygote clones each worker as a child of the
  daemon, so no other process stands between them);
- the kernel threads' utime+stime (children of kthreadd): namespace teardown the
  kernel defers to workqueues (e.g. a network namespace's cleanup). That count is
  system-wide, so it holds other users' work too, and is shown beside the total,
  not in it.

The runs' own `cpu_ms` (the daemon's wait4 rusage of the worker: its whole life,
jail preparation, the job and its exit) is summed by the client. The roles per
run are then:

- daemon, zygote: their deltas (zygote: the processes alive at both ends);
- worker before the job: the mean CPU of a ready worker (what a worker cost
  before it had a job; the ready ones at both ends of the cell, is_ready), per
  run, plus the change of the ready workers' total over the cell;
- worker running the job: the runs' `cpu_ms` less that mean (it includes the
  worker's exit and, with it, its pid namespace's and mounts' teardown);
- other: what is left of the tree's count (any process that started or died
  within the cell without being a run's worker, e.g. a restarted zygote, and
  the gap between a worker's sampled and mean preparation).

By construction the roles add up to the tree's count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import msgspec

from sandboxd.jail.contain import READY_FD

CPUACCT = "/sys/fs/cgroup/cpuacct"
PIDS = "/sys/fs/cgroup/pids"
_NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
KTHREADD = 2


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def process_cpu_ns(pid: int) -> int:
    """utime+stime of a process (all its threads), 0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0
    # fields[0] is state (field 3 of stat); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) * _NS_PER_TICK


def live_threads_ns(pid: int) -> int:
    """The run time of a process's live threads to the nanosecond (schedstat), 0 if gone.

    For young processes (a ready worker), whose utime+stime in clock ticks
    would mostly read 0; threads that already ended are not in it.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                total += int(handle.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def _members(procs_file: str) -> list[int]:
    try:
        with open(procs_file) as handle:
            return [int(line) for line in handle if line.strip()]
    except OSError:  # removed, or being removed (ENODEV), as its run ended
        return []


class TreeCgroup:
    """The bench's cpuacct cgroup the daemon (and so all its descendants) runs in."""

    def __init__(self, name: str) -> None:
        self.path = f"{CPUACCT}/{name}"
        os.makedirs(self.path, exist_ok=True)

    def wrap(self, command: list[str]) -> list[str]:
        """`command`, entering this cgroup first (the shell execs it: same pid)."""
        script = 'echo $$ > "$0" && exec "$@"'
        return ["/bin/sh", "-c", script, f"{self.path}/cgroup.procs", *command]

    def usage_ns(self) -> int:
        with open(f"{self.path}/cpuacct.usage") as handle:
            return int(handle.read())

    def members(self) -> list[int]:
        return _members(f"{self.path}/cgroup.procs")

    def remove(self, grace: float = 5.0) -> bool:
        """Once the daemon is gone: waits up to `grace` seconds for the last of its tree
        (workers die with the daemon: their parent-death signal) to leave; True when removed."""
        deadline = time.monotonic() + grace
        while True:
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)


class Snapshot(msgspec.Struct, frozen=True):
    tree_ns: int
    daemon_ns: int
    # Run time of each other live process of the tree (zygotes, templates, and workers
    # not yet in their cgroups), by pid: only those alive at both ends of a cell count
    # as the zygote role; the transient ones belong to the remainder ("other").
    others: dict[int, int]
    ready_ns: int  # the ready workers together
    # The ready workers of the measured language only (node workers have exec'd node):
    # what one of its workers cost before its job is their mean.
    like_ns: int
    like_workers: int
    kernel_threads_ns: int  # system-wide


def _kernel_threads_ns() -> int:
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (int(entry) == KTHREADD or parent_of(int(entry)) == KTHREADD):
            total += process_cpu_ns(int(entry))
    return total


def worker_leaves(daemon_pid: int) -> list[list[int]]:
    """The members of each of the daemon's per-run pids cgroups (the leaves of its tree,
    `sandboxd.PID/gGENERATION/NAME`)."""
    leaves = []
    for root, dirs, _ in os.walk(f"{PIDS}/sandboxd.{daemon_pid}"):
        if not dirs:
            members = _members(f"{root}/cgroup.procs")
            if members:
                leaves.append(members)
    return leaves


def _state(pid: int) -> str:
    """The process's state letter (R running, S sleeping, ...), "" if it is gone."""
    fields = _stat_fields(pid)
    return "" if fields is None else fields[0]


def is_ready(pid: int) -> bool:
    """Whether a worker has said "ready" and waits for its job: it holds its readiness
    pipe as fd 3 until then (python3 and node alike close it; before its jail's fd step
    fd 3 is an fd it inherited), and it is asleep in its read of the job after. A worker
    that sleeps while it prepares (a node one mid-start-up, a python one whose zygote
    was preempted before letting it go) still holds fd 3, and half its cost is no
    measure of a worker's preparation."""
    return _state(pid) == "S" and not os.path.lexists(f"/proc/{pid}/fd/{READY_FD}")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def take(tree: TreeCgroup, daemon_pid: int, node: bool) -> Snapshot:
    """The counters now; `node` picks which ready workers the before-job mean is over."""
    leaves = worker_leaves(daemon_pid)
    workers = {pid for leaf in leaves for pid in leaf}
    like = [leaf for leaf in leaves if (_comm(leaf[0]) == "node") == node and is_ready(leaf[0])]
    others = set(tree.members()) - workers - {daemon_pid}
    return Snapshot(
        tree_ns=tree.usage_ns(),
        daemon_ns=process_cpu_ns(daemon_pid),
        others={pid: live_threads_ns(pid) for pid in sorted(others)},
        ready_ns=_sum(live_threads_ns(pid) for pid in workers),
        like_ns=_sum(live_threads_ns(pid) for leaf in like for pid in leaf),
        like_workers=len(like),
        kernel_threads_ns=_kernel_threads_ns(),
    )


def _sum(values: Iterable[int]) -> int:
    return sum(values, 0)


# The roles, in the order they are printed.
ROLES = ("daemon", "zygote", "worker before job", "worker job+exit", "other")


class Breakdown(msgspec.Struct, frozen=True):
    """CPU per run of one cell, in ms, by role; `roles` sums to `total_ms`."""

    runs: int  # runs answered with a cpu_ms
    roles: dict[str, float]
    total_ms: float  # the tree cgroup's count per run
    kernel_threads_ms: float  # system-wide, per run; not in the total
    ready_workers: int  # workers the "before job" mean was taken over


def breakdown(before: Snapshot, after: Snapshot, runs: int, runs_cpu_ms: float) -> Breakdown:
    """The roles per run between two snapshots around `runs` runs whose cpu_ms sum is given."""
    per_run = 1e6 * max(1, runs)  # ns -> ms per run
    tree = after.tree_ns - before.tree_ns
    daemon = after.daemon_ns - before.daemon_ns
    zygote = _sum(
        ns - before.others[pid] for pid, ns in after.others.items() if pid in before.others
    )
    workers = runs_cpu_ms * 1e6 - before.ready_ns + after.ready_ns
    # The ready workers at both ends: those made before the cell and those made during it.
    count = before.like_workers + after.like_workers
    prepared_each = (before.like_ns + after.like_ns) / count if count else 0.0
    job = runs_cpu_ms * 1e6 - runs * prepared_each
    roles = {
        "daemon": daemon / per_run,
        "zygote": zygote / per_run,
        "worker before job": (workers - job) / per_run,
        "worker job+exit": job / per_run,
        "other": (tree - daemon - zygote - workers) / per_run,
    }
    return Breakdown(
        runs=runs,
        roles=roles,
        total_ms=tree / per_run,
        kernel_threads_ms=(after.kernel_threads_ns - before.kernel_threads_ns) / per_run,
        ready_workers=count,
    )
