"""The verdict table (verdict.py): a run's facts in, its status and fields out.

Wait statuses are made by real processes (a child that exits with a code or is
killed by a signal), so the table is read the way the daemon's wait4 reports it.
"""

from __future__ import annotations

import os
import signal

import pytest

from sandboxd import verdict
from sandboxd.control import Exited
from sandboxd.jail.cgroup import Usage
from sandboxd.jail.rlimits import cpu_seconds
from sandboxd.protocol import Status


def wait_status(*, code: int | None = None, signum: int | None = None) -> int:
    """The wait status of a real child that exited with `code` or died of `signum`."""
    pid = os.fork()
    if pid == 0:
        try:
            if signum is not None:
                if signum != signal.SIGKILL:
                    signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
        finally:
            os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    return status


EXIT_0 = wait_status(code=0)
EXIT_3 = wait_status(code=3)
SIGSYS = wait_status(signum=signal.SIGSYS)
SIGKILL = wait_status(signum=signal.SIGKILL)
SIGXCPU = wait_status(signum=signal.SIGXCPU)


def facts(
    status: int,
    *,
    cpu: float = 0.0,
    timeout: float = 2.0,
    usage: Usage | None = None,
    over_cap: bool = False,
    timed_out: bool = False,
    held_open: bool = False,
) -> verdict.Facts:
    return verdict.Facts(
        exited=Exited(status=status, utime=cpu, stime=0.0, maxrss_kb=10),
        stdout=b"out",
        stderr=b"err",
        over_cap=over_cap,
        timed_out=timed_out,
        held_open=held_open,
        wall_ms=12.3456,
        timeout=timeout,
        usage=usage,
    )


OOM = Usage(oom_kills=1, pids_max_hits=0, cpu_usec=None, peak_memory_bytes=5)
PIDS = Usage(oom_kills=0, pids_max_hits=1, cpu_usec=None, peak_memory_bytes=5)
BUSY_CGROUP = Usage(oom_kills=0, pids_max_hits=0, cpu_usec=3_000_000, peak_memory_bytes=5)

# (facts, status): most specific first, as verdict.status_of reads them.
TABLE: list[tuple[str, verdict.Facts, Status]] = [
    ("exit 0", facts(EXIT_0), "ok"),
    ("exit 3", facts(EXIT_3), "error"),
    ("seccomp kill", facts(SIGSYS), "blocked_syscall"),
    ("killed, little CPU", facts(SIGKILL, cpu=0.5), "killed"),
    ("killed at RLIMIT_CPU", facts(SIGKILL, cpu=2.0), "timeout"),
    ("SIGXCPU at RLIMIT_CPU", facts(SIGXCPU, cpu=2.5), "timeout"),
    ("cgroup CPU beats rusage", facts(SIGKILL, cpu=0.1, usage=BUSY_CGROUP), "timeout"),
    ("deadline", facts(SIGKILL, timed_out=True), "timeout"),
    ("held open", facts(EXIT_0, held_open=True), "timeout"),
    ("OOM beats the timeout", facts(SIGKILL, timed_out=True, usage=OOM), "memory"),
    ("pids.max beats the timeout", facts(SIGKILL, timed_out=True, usage=PIDS), "tasks"),
    (
        "output cap beats all",
        facts(SIGKILL, timed_out=True, usage=OOM, over_cap=True),
        "output_limit",
    ),
    ("deadline beats SIGSYS", facts(SIGSYS, timed_out=True), "timeout"),
]


@pytest.mark.parametrize(("case", "given", "status"), TABLE, ids=[row[0] for row in TABLE])
def test_the_verdict_table(case: str, given: verdict.Facts, status: Status) -> None:
    assert verdict.judge(7, given).status == status, case


def test_a_judged_run_carries_the_kernels_facts() -> None:
    result = verdict.judge(7, facts(SIGKILL, cpu=0.25, usage=OOM, over_cap=True))
    assert (result.id, result.exit_code, result.signal) == (7, None, signal.SIGKILL)
    assert (result.stdout, result.stderr, result.truncated) == ("out", "err", True)
    assert (result.wall_ms, result.cpu_ms, result.peak_memory_bytes) == (12.346, 250.0, 5)
    exited = verdict.judge(8, facts(EXIT_3))
    assert (exited.exit_code, exited.signal, exited.peak_memory_bytes) == (3, None, 10 * 1024)
    assert exited.message is None


def test_held_open_output_is_named_only_when_the_run_itself_was_in_time() -> None:
    assert verdict.judge(1, facts(EXIT_0, held_open=True)).message == verdict.HELD_OPEN
    late = verdict.judge(1, facts(SIGKILL, held_open=True, timed_out=True))
    assert late.message is None


def test_the_cpu_limit_set_is_the_one_judged() -> None:
    for timeout in (0.1, 1.0, 1.0000001, 2.5, 30.0):
        limit = cpu_seconds(timeout)
        assert limit >= timeout and limit >= 1
        under = verdict.judge(1, facts(SIGKILL, cpu=limit - 0.01, timeout=timeout))
        at = verdict.judge(1, facts(SIGKILL, cpu=float(limit), timeout=timeout))
        assert (under.status, at.status) == ("killed", "timeout")


def test_a_blocked_call_is_named_only_on_a_blocked_syscall_result() -> None:
    blocked = verdict.judge(1, facts(SIGSYS))
    assert verdict.with_blocked_call(blocked, "ptrace (x86_64 101)").message == (
        "blocked system call ptrace (x86_64 101)"
    )
    assert verdict.with_blocked_call(blocked, None).message is None
    ok = verdict.judge(1, facts(EXIT_0))
    assert verdict.with_blocked_call(ok, "ptrace").message is None


def test_a_request_that_never_ran_is_a_timeout_saying_so() -> None:
    queued = verdict.queued_too_long(4, 2531.0, 2.5)
    assert (queued.status, queued.exit_code, queued.cpu_ms, queued.wall_ms) == (
        "timeout",
        None,
        0.0,
        2531.0,
    )
    assert queued.message == "no worker became free within 2.5 s"


# --- The limits a run is held to (verdict.limits_of) ---


def test_a_runs_limits_come_from_its_timeout_memory_and_the_config() -> None:
    from sandboxd.config import LimitsConfig

    config = LimitsConfig(tasks=32, output_bytes=1000, file_size_mb=8, open_files=64)
    limits = verdict.limits_of(2.5, 128, config, cgroups=True)
    assert limits.wall_seconds == 2.5
    assert limits.cpu_seconds == 3 == cpu_seconds(2.5)
    assert limits.memory_bytes == 128 * 1024 * 1024
    assert limits.rlimit_memory_mb == 0  # the cgroup enforces memory
    assert (limits.tasks, limits.output_bytes) == (32, 1000)
    assert (limits.file_size_mb, limits.open_files) == (8, 64)
    assert limits.cgroup().memory_bytes == limits.memory_bytes
    assert limits.cgroup().tasks == 32
    assert limits.cgroup().cpu_percent == config.cpu_percent


def test_without_a_cgroup_memory_is_an_rlimit_and_a_short_run_gets_a_cpu_second() -> None:
    from sandboxd.config import LimitsConfig

    limits = verdict.limits_of(0.2, 64, LimitsConfig(), cgroups=False)
    assert limits.rlimit_memory_mb == 64
    assert limits.cpu_seconds == 1


def test_a_worker_is_prepared_with_the_limits_of_a_run_that_asked_for_nothing() -> None:
    from sandboxd.config import LimitsConfig

    config = LimitsConfig(timeout=7.0, memory_mb=300)
    assert verdict.default_limits(config) == verdict.limits_of(7.0, 300, config, cgroups=True)
