"""Listeners (inherited from systemd or our own) and the native NDJSON connections.

Listener construction is kept apart from serving: `unix_listener`/`tcp_listeners`
build trio listeners either from fds systemd passed in or from our own sockets,
and `serve_ndjson` only moves bytes between a stream and the sans-IO protocol.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat

import trio

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


async def _send(stream: trio.abc.Stream, lock: trio.Lock, message: bytes) -> None:
    async with lock:
        try:
            await stream.send_all(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left; its answer is dropped, the run is not affected


async def _answer(
    stream: trio.abc.Stream, lock: trio.Lock, service: Service, config: Config, request: RunRequest
) -> None:
    try:
        result = await service.run(job_from_request(request, config), request.id)
        await _send(stream, lock, encode(result))
    except ProtocolError as error:
        await _send(stream, lock, encode(error.reply(request.id)))


async def serve_ndjson(stream: trio.abc.Stream, service: Service, config: Config) -> None:
    """One client connection: many requests in flight, answers tagged with their id."""
    lines = LineBuffer(config.server.max_line_bytes)
    lock = trio.Lock()
    async with stream, trio.open_nursery() as nursery:
        try:
            while data := await stream.receive_some(RECEIVE_SIZE):
                try:
                    complete = lines.feed(bytes(data))
                except LineTooLong:
                    reply = ProtocolError(
                        "too_large", f"request line over {config.server.max_line_bytes} bytes"
                    ).reply(None)
                    await _send(stream, lock, encode(reply))
                    nursery.cancel_scope.cancel()
                    return
                for line in complete:
                    request = decode_request(line)
                    if isinstance(request, ErrorReply):
                        await _send(stream, lock, encode(request))
                    else:
                        nursery.start_soon(_answer, stream, lock, service, config, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client is gone; its runs still finish and release their workers
