"""The two systemd protocols the daemon speaks, in pure stdlib (no libsystemd).

Socket activation: systemd passes the sockets of sandboxd.socket as fds 3, 4, ...
with LISTEN_PID (whom they are for), LISTEN_FDS (how many) and LISTEN_FDNAMES
(their FileDescriptorName=, colon-separated). `listen_fds()` returns them by
name and removes the variables, so no child mistakes them for its own.

Notification (sd_notify): one datagram of newline-separated VAR=value lines to
the AF_UNIX socket named by NOTIFY_SOCKET (a path, or "@name" in the abstract
namespace). `Notifier` sends READY/RELOADING/STOPPING/STATUS/WATCHDOG; without
NOTIFY_SOCKET (`sandboxd serve` by hand) every method does nothing. Sending
never blocks and never raises into the daemon: a lost notification is logged,
and systemd's own timeouts are the backstop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

# First fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
# Name given to a passed fd whose name is missing (libsystemd uses the same).
UNKNOWN_NAME = "unknown"
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(
    environ: MutableMapping[str, str] = os.environ, pid: int | None = None
) -> dict[str, list[int]]:
    """The sockets systemd passed to this process, keyed by FileDescriptorName.

    Empty when not socket-activated, or when the variables name another pid
    (they were meant for a parent). The variables are removed either way, and
    every passed fd is made close-on-exec. Raises ValueError on a malformed
    environment: a daemon must not guess which fd is which.
    """
    values = {name: environ.pop(name, None) for name in _LISTEN_VARS}
    listen_pid, count, names = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if listen_pid is None or count is None:
        return {}
    if not listen_pid.isdigit() or int(listen_pid) != (os.getpid() if pid is None else pid):
        return {}
    if not count.isdigit():
        raise ValueError(f"LISTEN_FDS={count!r} is not a number")
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else [UNKNOWN_NAME] * len(fds)
    if len(labels) != len(fds):
        raise ValueError(f"LISTEN_FDNAMES names {len(labels)} sockets, LISTEN_FDS={count}")
    passed: dict[str, list[int]] = {}
    for fd, label in zip(fds, labels, strict=True):
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)  # OSError(EBADF) if systemd did not pass it
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        passed.setdefault(label or UNKNOWN_NAME, []).append(fd)
    return passed


class Notifier:
    """sd_notify to the service manager; every method is a no-op without one."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        # address: NOTIFY_SOCKET as systemd sets it ("/path" or "@abstract"), or None.
        self._address: str | None = None
        if address is not None:
            if address.startswith("@"):
                self._address = "\0" + address[1:]
            elif address.startswith("/"):
                self._address = address
            else:
                log.warning("NOTIFY_SOCKET=%r is not a Unix socket; not notifying", address)
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET") or None, _watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self) -> None:
        self._send("READY=1")

    def reloading(self) -> None:
        # systemd 253+ (Type=notify-reload) wants the monotonic time of the
        # reload start; 252 (Debian 12) ignores the extra line.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        # One line: a newline would start another VAR= assignment.
        self._send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds within which systemd expects WATCHDOG=1 (ping at half of it)."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
            self._socket.sendto(message.encode(), self._address)
        except OSError as error:
            log.warning("sd_notify %r failed: %s", message.split("\n", 1)[0], error)


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC if it is meant for this process (WATCHDOG_PID, when set, is us)."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec)
