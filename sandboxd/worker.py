"""The daemon's side of one worker: its fds, readiness, and running one job on it.

The facts of a run are gathered only from what the daemon itself observed: the
bytes read from the stdout/stderr pipes (capped), the keeper's wait4 status and
rusage, whether the daemon killed it (timeout, output cap), and the kernel's
cgroup counters; verdict.py judges them. Nothing the worker says after it got
ready is believed.

The answer is bounded by the deadline (DESIGN.md invariant 18): when the worker
has exited, its whole pid namespace is gone and the pipes reach end-of-file at
once, unless a process outside it holds their write ends (another run it
passed them to). So the daemon reads output only until the deadline (or the
exit, if a killed worker was reaped later) plus OUTPUT_GRACE, then stops
feeding stdin and reading, and the run is a `timeout`.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from sandboxd import artifacts, control, verdict
from sandboxd.control import Exited, JobHeader, Ready
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
    """The daemon's handle on one jailed worker: its pipes and its keeper's socket."""

    def __init__(
        self,
        worker_id: int,
        language: str,
        uid: int,
        fds: list[int],
        cgroup: RunCgroup | None,
        on_close: Callable[[], None],
    ) -> None:
        job_w, out_r, err_r, ctl = fds
        self.worker_id = worker_id
        self.language = language
        self.uid = uid
        self.cgroup = cgroup
        self._job = trio.lowlevel.FdStream(job_w)
        self._out = trio.lowlevel.FdStream(out_r)
        self._err = trio.lowlevel.FdStream(err_r)
        self._ctl = trio.socket.from_stdlib_socket(
            socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=ctl)
        )
        self.exited: Exited | None = None
        # The worker's pid in the host's pid namespace, once it is ready.
        self.pid: int | None = None
        # Tells the worker's generation that one fewer of its workers is alive.
        self._on_close = on_close

    async def _receive(self) -> Ready | Exited:
        try:
            packet = await self._ctl.recv(control.MAX_PACKET)
        except OSError as error:  # ECONNRESET: the keeper was killed with a packet unread
            raise ProtocolError("internal", "worker keeper vanished") from error
        if not packet:
            raise ProtocolError("internal", "worker keeper vanished")
        message: Ready | Exited = control.keeper_decoder.decode(packet)
        return message

    async def wait_ready(self) -> None:
        """Until the worker reports it is jailed; raises with the setup error otherwise."""
        message = await self._receive()
        if isinstance(message, Exited):
            self.exited = message
            raise ProtocolError("internal", f"worker setup failed: {message.setup_error}")
        self.pid = message.pid

    async def kill(self) -> None:
        try:
            await self._ctl.send(control.KILL)
        except OSError:
            pass  # keeper already gone: the worker died with it (parent-death signal)

    def gone(self) -> bool:
        """Whether a ready worker's keeper has spoken or hung up since (its worker died)."""
        poller = select.poll()
        poller.register(self._ctl.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def close(self) -> None:
        for stream in (self._job, self._out, self._err):
            await stream.aclose()
        self._ctl.close()
        self._on_close()

    async def _feed(self, payload: bytes) -> None:
        try:
            await self._job.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the code exited without reading all its stdin
        finally:
            await self._job.aclose()

    async def _drain(self, stream: trio.lowlevel.FdStream, sink: bytearray, output: Output) -> None:
        while chunk := await stream.receive_some(READ_CHUNK):
            room = output.room()
            if len(chunk) > room:
                sink += chunk[: max(room, 0)]
                if not output.exceeded:
                    output.exceeded = True
                    await self.kill()
            else:
                sink += chunk

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
        payload = control.frame_job(header) + job.stdin.encode()
        output = Output(output_cap)
        started = trio.current_time()
        timed_out = False
        drained = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed, payload)
            nursery.start_soon(self._drain_all, output, drained)
            with trio.move_on_at(deadline):
                self.exited = await self._wait_exit()
            if self.exited is None:
                timed_out = True
                await self.kill()
                with trio.fail_after(KILL_GRACE):
                    self.exited = await self._wait_exit()
            # What the run wrote before it exited is in the pipes already: read it
            # all, however late a killed worker was reaped.
            with trio.move_on_at(max(deadline, trio.current_time()) + OUTPUT_GRACE):
                await drained.wait()
            held_open = not drained.is_set()
            nursery.cancel_scope.cancel()  # stop feeding and reading: invariant 18
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

    async def _drain_all(self, output: Output, drained: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain, self._out, output.stdout, output)
            nursery.start_soon(self._drain, self._err, output.stderr, output)
        drained.set()

    async def _wait_exit(self) -> Exited:
        message = await self._receive()
        if isinstance(message, Ready):
            raise ProtocolError("internal", "worker reported ready twice")
        return message

    async def wait_exit(self) -> None:
        """Until the keeper reports the exit (a worker retired without a run); never raises."""
        try:
            while self.exited is None:
                message = await self._receive()
                if isinstance(message, Exited):
                    self.exited = message
        except ProtocolError:
            pass  # keeper gone: the worker went with it (parent-death signal)
