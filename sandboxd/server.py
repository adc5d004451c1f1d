"""Listeners (inherited from systemd or our own), their accept loops, and the native
NDJSON connections.

Listener construction is kept apart from serving: `bind_unix`/`bind_tcp` and
`listener` build trio listeners either from fds systemd passed in or from our own
sockets; `serve_listener` accepts, caps the connections served at once, and
contains each one (an exception in a connection is logged with its peer and closes
that connection only); `serve_ndjson` only moves bytes between a stream and the
sans-IO protocol.

Bounds on one NDJSON connection ([clients] in the config):
- its unfinished line and every request in flight (each copy of it) hold bytes
  of the daemon-wide ByteBudget; a request that does not fit gets ``overloaded``,
  an unfinished line that does not fit gets ``overloaded`` and a close;
- answers go out through one writer task, counted in the budget until sent (they
  may pass it: they exist already, and new requests are refused meanwhile);
  answers not yet sent past ``max_unsent_bytes``, or one send that takes longer
  than ``send_timeout`` (a client that sends and never reads), close the
  connection and cancel its runs.
"""

from __future__ import annotations

import errno
import grp
import logging
import math
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable

import trio

from sandboxd.budget import ByteBudget, Holding, request_cost
from sandboxd.config import Config
from sandboxd.jobs import Service, job_from_request
from sandboxd.protocol import (
    ErrorReply,
    LineBuffer,
    LineTooLong,
    ProtocolError,
    RunRequest,
    decode_request,
    encode,
)

log = logging.getLogger("sandboxd.server")
RECEIVE_SIZE = 65536


def bind_unix(path: str, mode: int, group: str) -> socket.socket:
    """Our own Unix socket at `path`, mode bits and group applied before listen()."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            log.info("group %r does not exist; %s stays root's", group, path)
    os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(512)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock


def listener(sock: socket.socket) -> trio.SocketListener:
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


# --- accept loops ----------------------------------------------------------------------

# accept() errors that mean "out of fds or memory for now": wait and try again
# (trio.serve_listeners' list). Any other error means the listening socket itself is
# broken, and it propagates.
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_SLEEP = 0.1
# Seconds a refusal of a connection over the cap may take to be written.
REFUSAL_TIMEOUT = 1.0


def describe_peer(stream: trio.abc.Stream) -> str:
    """Who is on the other end: address for TCP, pid/uid for a Unix socket."""
    if not isinstance(stream, trio.SocketStream):
        return type(stream).__name__
    sock = stream.socket
    try:
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            return f"unix peer pid {pid} uid {uid}"
        return f"tcp peer {sock.getpeername()}"
    except OSError as error:
        return f"peer unknown ({error.strerror})"


Handler = Callable[[trio.abc.Stream], Awaitable[None]]


async def _serve_contained(
    handler: Handler, stream: trio.abc.Stream, slots: trio.Semaphore
) -> None:
    """One connection; whatever it raises is logged with its peer and costs it alone."""
    try:
        await handler(stream)
    except Exception:
        log.exception("connection failed (%s); closed it", describe_peer(stream))
    finally:
        slots.release()
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _refuse(stream: trio.abc.Stream, refusal: bytes) -> None:
    with trio.move_on_after(REFUSAL_TIMEOUT):
        try:
            await stream.send_all(refusal)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left before reading its refusal
    await stream.aclose()


async def serve_listener(
    listener: trio.SocketListener,
    handler: Handler,
    refusal: bytes,
    max_connections: int,
    connections: trio.Nursery,
) -> None:
    """Accept until cancelled; at most `max_connections` served at once, and a connection
    past that is sent `refusal` (an overloaded answer) and closed."""
    slots = trio.Semaphore(max_connections)
    while True:
        try:
            stream = await listener.accept()
        except OSError as error:
            if error.errno not in ACCEPT_RETRY_ERRNOS:
                raise
            log.error("accept failed, retrying: %s", error)
            await trio.sleep(ACCEPT_RETRY_SLEEP)
            continue
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            log.warning("over %d connections: refused %s", max_connections, describe_peer(stream))
            await _refuse(stream, refusal)
            continue
        connections.start_soon(_serve_contained, handler, stream, slots)


def ndjson_refusal(max_connections: int) -> bytes:
    """What a native client over the connection cap reads before the close."""
    message = f"more than {max_connections} connections on this socket; retry later"
    return encode(ProtocolError("overloaded", message).reply(None))


# --- one NDJSON connection ------------------------------------------------------------

BUFFERS_FULL = "the daemon holds too many request bytes; retry later"


class _Drop(Exception):
    """The connection must close after one last answer: its client passed a bound."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(error.message)
        self.error = error


class _NdjsonConnection:
    def __init__(
        self, stream: trio.abc.Stream, service: Service, config: Config, budget: ByteBudget
    ) -> None:
        self.stream = stream
        self.service = service
        self.config = config
        self.budget = budget
        self.peer = describe_peer(stream)
        # Bytes queued for the writer and not yet sent, all held in the budget.
        self.unsent = 0
        self.outbox: trio.MemorySendChannel[bytes]
        self.to_send: trio.MemoryReceiveChannel[bytes]
        self.outbox, self.to_send = trio.open_memory_channel(math.inf)
        self.cancel = trio.CancelScope()
        self.dropped = False

    def drop(self, why: str, level: int = logging.WARNING) -> None:
        """Close the connection now and cancel its runs."""
        if not self.dropped:
            log.log(level, "closing NDJSON connection (%s): %s", self.peer, why)
        self.dropped = True
        self.cancel.cancel()

    def queue(self, message: bytes) -> None:
        """Hand an answer to the writer, within the connection's and the daemon's bounds."""
        clients = self.config.clients
        if self.dropped:
            return
        # One answer always goes out (it exists already, and output_bytes may lie near
        # the cap); a client that does not read gets no second one past the cap.
        if self.unsent and self.unsent + len(message) > clients.max_unsent_bytes:
            cap = clients.max_unsent_bytes
            self.drop(f"over {cap} bytes of answers unsent (the client does not read)")
        else:
            self.budget.charge(len(message))
            self.unsent += len(message)
            self.outbox.send_nowait(message)

    async def write(self) -> None:
        """The one task that sends: each answer within send_timeout, or the connection goes."""
        timeout = self.config.clients.send_timeout
        async for message in self.to_send:
            try:
                with trio.move_on_after(timeout):
                    await self.stream.send_all(message)
                    continue
                self.drop(f"an answer was not taken within {timeout} s (the client does not read)")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # No one reads the answers of its runs any more: they are cancelled.
                self.drop("the client went away", logging.INFO)
            finally:
                self.unsent -= len(message)
                self.budget.give(len(message))

    async def answer(self, request: RunRequest, cost: int) -> None:
        """Run one request holding `cost` bytes of the budget, and queue its answer."""
        try:
            job = job_from_request(request, self.config)
            answer = encode(await self.service.run(job, request.id))
        except ProtocolError as error:
            answer = encode(error.reply(request.id))
        except Exception:  # a fault of ours costs this request, not the connection
            log.exception("request failed inside the daemon (%s)", self.peer)
            answer = encode(ProtocolError("internal", "sandbox failure").reply(request.id))
        finally:
            self.budget.give(cost)  # the request is done with; its answer is held instead
        self.queue(answer)

    def dispatch(self, line: bytes, runs: trio.Nursery) -> None:
        request = decode_request(line)
        if isinstance(request, ErrorReply):
            self.queue(encode(request))
        elif not self.budget.take(cost := request_cost(len(line))):
            busy = ProtocolError("overloaded", BUFFERS_FULL)
            self.queue(encode(busy.reply(request.id)))
        else:
            runs.start_soon(self.answer, request, cost)

    async def _receive(self) -> bytes:
        """The next bytes from the client; b"" at its end of file or when it reset."""
        try:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        except trio.BrokenResourceError:
            return b""

    async def read(self, runs: trio.Nursery) -> None:
        """Split lines until the client's end of file; answers go out through the writer."""
        max_line = self.config.server.max_line_bytes
        lines = LineBuffer(max_line)
        with Holding(self.budget) as pending:
            while data := await self._receive():
                try:
                    complete = lines.feed(data)
                except LineTooLong:
                    raise _Drop(
                        ProtocolError("too_large", f"request line over {max_line} bytes")
                    ) from None
                if not pending.resize(lines.pending):
                    raise _Drop(ProtocolError("overloaded", BUFFERS_FULL))
                for line in complete:
                    self.dispatch(line, runs)

    async def serve(self) -> None:
        try:
            with self.cancel:
                async with trio.open_nursery() as writer:
                    writer.start_soon(self.write)
                    async with trio.open_nursery() as runs:
                        try:
                            await self.read(runs)
                        except _Drop as last:
                            log.info("closing NDJSON connection (%s): %s", self.peer, last)
                            self.queue(encode(last.error.reply(None)))
                            runs.cancel_scope.cancel()
                    # Every run has answered; the writer sends what is queued, then ends.
                    self.outbox.close()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client is gone; its runs were cancelled with the connection
        finally:
            self.budget.give(self.unsent)  # answers that were never sent
            self.unsent = 0


async def serve_ndjson(
    stream: trio.abc.Stream, service: Service, config: Config, budget: ByteBudget | None = None
) -> None:
    """One client connection: many requests in flight, answers tagged with their id.

    `budget` is shared by all connections of a daemon; None gives this one its own.
    """
    budget = budget if budget is not None else ByteBudget(config.clients.max_buffered_bytes)
    async with stream:
        await _NdjsonConnection(stream, service, config, budget).serve()
