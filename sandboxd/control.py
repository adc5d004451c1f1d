"""Messages between the daemon and the zygote (msgpack over SOCK_SEQPACKET, one
message per packet), and the job header a worker reads from fd 0.

These cross a trust boundary only in one direction: the daemon trusts the zygote
(root, never runs user code); the worker is trusted only until it reports ready
on its readiness pipe, and after that the daemon reads nothing from it but
stdout/stderr.
"""

from __future__ import annotations

import os
import struct

import msgspec

from sandboxd.jail import JailSpec


class SpawnOrder(msgspec.Struct, frozen=True, tag=True):
    worker_id: int
    # The runtime (a JailSpec.runtimes key) of the worker; its template forks it if it has one.
    runtime: str
    uid: int
    # cgroup.procs files the worker is written into before it prepares its jail.
    cgroup_procs: list[str] = []
    # Join the egress network namespace instead of a network namespace of its own.
    network: bool = False


class Spawned(msgspec.Struct, frozen=True, tag=True):
    """Sent with SPAWNED_FDS fds: job write end, stdout read end, stderr read end,
    readiness read end, and a pidfd of the worker (a child of the daemon)."""

    worker_id: int
    # The worker's pid in the daemon's pid namespace (the daemon wait4s it).
    pid: int


# How many fds come with a Spawned.
SPAWNED_FDS = 5


class SpawnFailed(msgspec.Struct, frozen=True, tag=True):
    worker_id: int
    message: str


class Exited(msgspec.Struct, frozen=True):
    """The worker's wait status and rusage, from the daemon's own wait4."""

    status: int
    utime: float
    stime: float
    maxrss_kb: int
    # Why the worker failed to get ready ("" when it did get ready).
    setup_error: str = ""


ZygoteReply = Spawned | SpawnFailed


class JobHeader(msgspec.Struct, frozen=True):
    """What a worker reads first on fd 0; the job's stdin bytes follow it."""

    code: str
    preload: str
    timeout: float
    memory_mb: int
    # The request's files (written into the working directory before the code runs).
    files: dict[str, bytes] = {}
    # Starts the trailer of images and files on stdout (artifacts.py); "" for none.
    boundary: str = ""


# The first message on the zygote's control socket.
class ZygoteStart(msgspec.Struct, frozen=True, tag=True):
    spec: JailSpec


_LENGTH = struct.Struct(">I")

encoder = msgspec.msgpack.Encoder()
zygote_reply_decoder = msgspec.msgpack.Decoder(ZygoteReply)
order_decoder = msgspec.msgpack.Decoder(SpawnOrder | ZygoteStart)
_header_decoder = msgspec.msgpack.Decoder(JobHeader)

# Packets on the control sockets never exceed this (orders and replies are small).
MAX_PACKET = 64 * 1024


def frame_job(header: JobHeader) -> bytes:
    body = encoder.encode(header)
    return _LENGTH.pack(len(body)) + body


def read_job(fd: int) -> JobHeader:
    """Read exactly one framed job header from fd (blocking)."""
    (length,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size))
    return _header_decoder.decode(_read_exact(fd, length))


def _read_exact(fd: int, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = os.read(fd, size - len(chunks))
        if not chunk:
            raise EOFError("job stream ended early")
        chunks += chunk
    return bytes(chunks)
