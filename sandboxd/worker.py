"""The daemon's side of one worker: its fds, readiness, and running one job on it.

The facts of a run are gathered only from what the daemon itself observed: the
bytes read from the stdout/stderr pipes (capped), its own wait4 status and
rusage of the worker (its child: the zygote clones it with CLONE_PARENT),
whether the daemon killed it (timeout, output cap), and the kernel's cgroup
counters; verdict.py judges them. Nothing the worker says after it got ready is
believed.

The answer is bounded by the deadline (DESIGN.md invariant 18): when the worker
has exited, its whole pid namespace is gone and the pipes reach end-of-file at
once, unless a process outside it holds their write ends (another run it
passed them to). So the daemon reads output only until the deadline (or the
exit, if a killed worker was reaped later) plus OUTPUT_GRACE, then stops
feeding stdin and reading, and the run is a `timeout`.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from sandboxd import artifacts, control, verdict
from sandboxd.control import Exited, JobHeader
from sandboxd.jail.cgroup import RunCgroup
from sandboxd.jobs import Job
from sandboxd.protocol import ProtocolError, RequestId, RunResult

# How long a killed worker may take to be reaped before the run is declared lost.
KILL_GRACE = 10.0
READ_CHUNK = 65536
# How long after the deadline the daemon still waits for end-of-file on the output.
OUTPUT_GRACE = 0.5


@dataclass
class Output:
    """stdout and stderr, sharing one byte budget."""

    cap: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exceeded: bool = False

    def room(self) -> int:
        return self.cap - len(self.stdout) - len(self.stderr)


class WorkerHandle:
    """The daemon's handle on one jailed worker, its child: its pipes and a pidfd.

    A run is one task waiting on one fd: an epoll fd of the worker's own (made when
    it got ready) holding the stdout/stderr pipes until their end of file, the
    pidfd until the worker is reaped, and the job pipe while stdin is still being
    fed (a job that fits in the pipe is written at once and the pipe closed). Each
    readiness costs one read or write, so a flood cannot keep the task from its
    next checkpoint, and the deadline bounds every wait.
    """

    def __init__(
        self,
        worker_id: int,
        language: str,
        uid: int,
        pid: int,
        fds: list[int],
        cgroup: RunCgroup | None,
        on_close: Callable[[], None],
    ) -> None:
        self._job_w, self._out_r, self._err_r, self._ready_r, self._pidfd = fds
        # Never block the event loop on a pipe, whoever else holds its other end.
        for fd in (self._job_w, self._out_r, self._err_r):
            os.set_blocking(fd, False)
        self.worker_id = worker_id
        self.language = language
        self.uid = uid
        self.cgroup = cgroup
        self._spawned_pid = pid
        # What is left of the job to write to the job pipe.
        self._unsent = memoryview(b"")
        # What the run waits on, made once the worker is ready (off the request path).
        self._events: select.epoll | None = None
        self.exited: Exited | None = None
        # The worker's pid in the host's pid namespace, once it is ready.
        self.pid: int | None = None
        # Tells the worker's generation that one fewer of its workers is alive.
        self._on_close = on_close

    def _reap_now(self, setup_error: str = "") -> bool:
        """Reap the worker if it has exited (wait4 status and rusage); True if it was.
        The daemon is its parent and has not reaped it, so its pid is still its own."""
        pid, status, usage = os.wait4(self._spawned_pid, os.WNOHANG)
        if not pid:
            return False
        self.exited = Exited(status, usage.ru_utime, usage.ru_stime, usage.ru_maxrss, setup_error)
        return True

    async def _reap(self, setup_error: str = "") -> Exited:
        """Until the worker has exited (its pidfd), then its wait4 status and rusage."""
        while not self._reap_now(setup_error):
            await trio.lowlevel.wait_readable(self._pidfd)
        assert self.exited is not None
        return self.exited

    async def wait_ready(self) -> None:
        """Until the worker reports it is jailed; raises with the setup error otherwise."""
        # Its write end is the worker's alone (the zygote closed its own after placing it),
        # so a worker that died while preparing leaves its reason, or end-of-file.
        await trio.lowlevel.wait_readable(self._ready_r)
        message = os.read(self._ready_r, 4096)
        os.close(self._ready_r)
        self._ready_r = -1
        if message == b"ok":
            self.pid = self._spawned_pid
            self._events = select.epoll()
            for fd in (self._out_r, self._err_r, self._pidfd):
                self._events.register(fd, select.EPOLLIN)
            return
        exited = await self._reap(message.decode(errors="replace"))
        status = describe_status(exited.status)
        reason = exited.setup_error or f"worker {status} before it was ready"
        raise ProtocolError("internal", f"worker setup failed: {reason}")

    def kill(self) -> None:
        if self.exited is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited already, not reaped yet

    def gone(self) -> bool:
        """Whether a ready worker has exited since (e.g. it was killed)."""
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def _close_pipes(self) -> None:
        # No trio task waits on these (only the worker's epoll fd holds them), so
        # closing needs no notify_closing; closing also drops them from that epoll fd.
        for fd in (self._job_w, self._out_r, self._err_r):
            if fd >= 0:
                os.close(fd)
        self._job_w = self._out_r = self._err_r = -1
        if self._events is not None:
            self._events.close()
            self._events = None

    async def close(self) -> None:
        self._close_pipes()
        for fd in (self._ready_r, self._pidfd):
            if fd >= 0:
                os.close(fd)
        self._ready_r = self._pidfd = -1
        self._on_close()

    def _feed(self) -> None:
        """Write what the job pipe takes now; close it once the job is written or the
        code exited without reading all its stdin."""
        try:
            self._unsent = self._unsent[os.write(self._job_w, self._unsent) :]
        except BlockingIOError:
            return
        except BrokenPipeError:
            self._unsent = memoryview(b"")
        if not self._unsent:
            os.close(self._job_w)
            self._job_w = -1

    def _drain(self, fd: int, output: Output) -> None:
        """One read of a ready output pipe into its share of the cap (the worker is
        killed past it); its end of file closes it."""
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            os.close(fd)
            if fd == self._out_r:
                self._out_r = -1
            else:
                self._err_r = -1
            return
        sink = output.stdout if fd == self._out_r else output.stderr
        room = output.room()
        if len(chunk) > room:
            sink += chunk[: max(room, 0)]
            if not output.exceeded:
                output.exceeded = True
                self.kill()
        else:
            sink += chunk

    def _drained(self) -> bool:
        return self._out_r < 0 and self._err_r < 0

    def _reaped(self) -> bool:
        return self.exited is not None

    async def _serve(self, events: select.epoll, output: Output, done: Callable[[], bool]) -> None:
        """Feed stdin, drain the output and reap the worker as the kernel reports each
        ready, until done()."""
        while not done():
            await trio.lowlevel.wait_readable(events.fileno())
            for fd, _ in events.poll(0):
                if fd == self._job_w:
                    self._feed()
                elif fd == self._pidfd:
                    if self._reap_now():
                        # Reaped: the pidfd has nothing more to say (closing drops it).
                        os.close(self._pidfd)
                        self._pidfd = -1
                elif fd in (self._out_r, self._err_r):
                    self._drain(fd, output)

    async def run(
        self,
        job: Job,
        request_id: RequestId,
        deadline: float,
        output_cap: int,
        rlimit_memory_mb: int,
    ) -> RunResult:
        """Run the job and judge it (verdict.py); rlimit_memory_mb 0 keeps the worker's
        backstop (cgroups enforce)."""
        boundary = artifacts.new_boundary() if job.language == "python3" else ""
        header = JobHeader(
            code=job.code,
            preload=job.preload,
            timeout=job.timeout,
            memory_mb=rlimit_memory_mb,
            files=job.files,
            boundary=boundary,
        )
        output = Output(output_cap)
        started = trio.current_time()
        timed_out = False
        events = self._events
        assert events is not None, "wait_ready() first"
        try:
            self._unsent = memoryview(control.frame_job(header) + job.stdin.encode())
            self._feed()
            if self._job_w >= 0:  # stdin larger than the pipe: fed as the worker reads it
                events.register(self._job_w, select.EPOLLOUT)
            with trio.move_on_at(deadline):
                await self._serve(events, output, self._reaped)
            if self.exited is None:
                timed_out = True
                self.kill()
                with trio.fail_after(KILL_GRACE):
                    await self._serve(events, output, self._reaped)
            # What the run wrote before it exited is in the pipes already: read it
            # all, however late a killed worker was reaped.
            with trio.move_on_at(max(deadline, trio.current_time()) + OUTPUT_GRACE):
                await self._serve(events, output, self._drained)
            held_open = not self._drained()
        finally:
            self._close_pipes()  # stop feeding and reading: invariant 18
        wall_ms = (trio.current_time() - started) * 1000
        assert self.exited is not None
        split = artifacts.split(bytes(output.stdout), boundary)
        facts = verdict.Facts(
            exited=self.exited,
            stdout=split.stdout,
            stderr=bytes(output.stderr),
            over_cap=output.exceeded,
            timed_out=timed_out,
            held_open=held_open,
            wall_ms=wall_ms,
            timeout=job.timeout,
            usage=self.cgroup.usage() if self.cgroup else None,
            images=split.images,
            files=split.files,
            artifacts_truncated=split.truncated,
        )
        return verdict.judge(request_id, facts)

    async def wait_exit(self) -> None:
        """Until the worker has exited and is reaped (a worker retired without a run)."""
        if self.exited is None:
            await self._reap()


def describe_status(status: int) -> str:
    """A wait status in words, naming a seccomp kill (e.g. a runtime's start-up needs)."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            return f"was killed by signal {signum} ({signal.Signals(signum).name})"
        except ValueError:
            return f"was killed by signal {signum}"
    return f"exited with status {os.WEXITSTATUS(status)}"
