"""What a request came to: the one place a run's status and message are decided.

Every answer to a run is a protocol.RunResult built here, from what the daemon
itself observed (Facts: its own wait4 status and rusage, the kernel's cgroup
counters, the captured output, whether the daemon killed the run), never from the
worker's word. limits_of() derives the limits a run is held to (each with its own
verdict below); three answers come from here:

- judge(): a run that got a worker, by the table in its docstring;
- queued_too_long(): a request whose timeout passed before any worker was free;
- with_blocked_call(): a `blocked_syscall` run, with the call the kernel named.

The CPU limit a run is held to (jail/rlimits.cpu_seconds) is the one it is judged by.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import msgspec

from sandboxd import artifacts
from sandboxd.config import LimitsConfig
from sandboxd.control import Exited
from sandboxd.jail.cgroup import Limits, Usage
from sandboxd.jail.rlimits import cpu_seconds
from sandboxd.protocol import RequestId, RunResult, Status

# A run that exited in time but whose pipes another process still held open.
HELD_OPEN = "the run's output pipes were still held open after its deadline"
MIB = 1024 * 1024


@dataclass(frozen=True)
class RunLimits:
    """The limits one run is held to, with the verdict each one gives."""

    # Seconds from admission to the deadline, queue wait included -> timeout.
    wall_seconds: float
    # RLIMIT_CPU soft limit (whole seconds) -> timeout.
    cpu_seconds: int
    # The run cgroup's memory.max (no swap) -> memory.
    memory_bytes: int
    # RLIMIT_DATA the worker lowers itself to once it has the job; 0 keeps the spec's
    # backstop, because the cgroup enforces memory_bytes.
    rlimit_memory_mb: int
    # The run cgroup's pids.max -> tasks.
    tasks: int
    # The run cgroup's CPU quota in percent of one core (0: none).
    cpu_percent: int
    # stdout+stderr kept -> output_limit (and truncated).
    output_bytes: int
    # RLIMIT_FSIZE and RLIMIT_NOFILE (set while the worker is prepared).
    file_size_mb: int
    open_files: int

    def cgroup(self) -> Limits:
        """What the run cgroup is created with."""
        return Limits(self.memory_bytes, self.tasks, self.cpu_percent)


def limits_of(timeout: float, memory_mb: int, limits: LimitsConfig, cgroups: bool) -> RunLimits:
    """The limits of a run with this (capped) timeout and memory, under [limits];
    `cgroups` says whether its worker has a run cgroup to enforce memory and tasks."""
    return RunLimits(
        wall_seconds=timeout,
        cpu_seconds=cpu_seconds(timeout),
        memory_bytes=memory_mb * MIB,
        rlimit_memory_mb=0 if cgroups else memory_mb,
        tasks=limits.tasks,
        cpu_percent=limits.cpu_percent,
        output_bytes=limits.output_bytes,
        file_size_mb=limits.file_size_mb,
        open_files=limits.open_files,
    )


def default_limits(limits: LimitsConfig) -> RunLimits:
    """The limits of a run that asked for nothing: what a worker is prepared with."""
    return limits_of(limits.timeout, limits.memory_mb, limits, cgroups=True)


@dataclass(frozen=True)
class Facts:
    """What the daemon observed of one run, and the timeout it was given."""

    exited: Exited
    stdout: bytes
    stderr: bytes
    # The daemon killed the run for going past the output cap.
    over_cap: bool
    # The deadline passed before the worker exited.
    timed_out: bool
    # The exit came in time, but the output pipes stayed open past the deadline.
    held_open: bool
    wall_ms: float
    timeout: float
    usage: Usage | None
    images: list[artifacts.Artifact] = field(default_factory=list)
    files: list[artifacts.Artifact] = field(default_factory=list)
    # Artifacts (figures, /tmp/out files) were dropped for the output cap.
    artifacts_truncated: bool = False


def status_of(facts: Facts) -> Status:
    """Most specific first: a limit the kernel enforced (OOM kill, pids.max) explains
    a run better than the timeout that followed."""
    status_word = facts.exited.status
    signum = os.WTERMSIG(status_word) if os.WIFSIGNALED(status_word) else None
    usage = facts.usage
    if facts.over_cap:
        return "output_limit"
    if usage is not None and usage.oom_kills > 0:
        return "memory"
    if usage is not None and usage.pids_max_hits > 0:
        return "tasks"
    if facts.timed_out or facts.held_open:
        return "timeout"
    if signum == signal.SIGSYS:
        return "blocked_syscall"
    if signum in (signal.SIGKILL, signal.SIGXCPU) and used_cpu(facts) >= cpu_seconds(facts.timeout):
        return "timeout"  # RLIMIT_CPU
    if signum is not None:
        return "killed"
    if os.WEXITSTATUS(status_word) == 0:
        return "ok"
    return "error"


def used_cpu(facts: Facts) -> float:
    """CPU seconds the run used: its cgroup's count where there is one, else rusage."""
    if facts.usage is not None and facts.usage.cpu_usec is not None:
        return facts.usage.cpu_usec / 1e6
    return facts.exited.utime + facts.exited.stime


def judge(request_id: RequestId, facts: Facts) -> RunResult:
    """The answer to a run that got a worker."""
    status_word = facts.exited.status
    peak = facts.usage.peak_memory_bytes if facts.usage is not None else None
    return RunResult(
        id=request_id,
        status=status_of(facts),
        exit_code=os.WEXITSTATUS(status_word) if os.WIFEXITED(status_word) else None,
        signal=os.WTERMSIG(status_word) if os.WIFSIGNALED(status_word) else None,
        stdout=facts.stdout.decode("utf-8", errors="replace"),
        stderr=facts.stderr.decode("utf-8", errors="replace"),
        truncated=facts.over_cap or facts.artifacts_truncated,
        wall_ms=round(facts.wall_ms, 3),
        cpu_ms=round(used_cpu(facts) * 1000, 3),
        peak_memory_bytes=peak if peak is not None else facts.exited.maxrss_kb * 1024,
        message=HELD_OPEN if facts.held_open and not facts.timed_out else None,
        images=facts.images,
        files=facts.files,
    )


def with_blocked_call(result: RunResult, call: str | None) -> RunResult:
    """A `blocked_syscall` result naming the call seccomp refused, when the kernel said."""
    if result.status != "blocked_syscall" or call is None:
        return result
    return msgspec.structs.replace(result, message=f"blocked system call {call}")


def queued_too_long(request_id: RequestId, waited_ms: float, timeout: float) -> RunResult:
    """A request whose whole timeout (seconds) passed while it waited for a worker: a
    timeout whose message says no run was started, unlike a run that took too long. The
    message names the request's timeout; wall_ms says how long it really waited."""
    return RunResult(
        id=request_id,
        status="timeout",
        exit_code=None,
        signal=None,
        stdout="",
        stderr="",
        truncated=False,
        wall_ms=round(waited_ms, 3),
        cpu_ms=0.0,
        peak_memory_bytes=None,
        message=f"no worker became free within {timeout:g} s",
    )
