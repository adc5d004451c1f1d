"""Which system call a seccomp kill refused, from the kernel's own audit record.

When seccomp kills a process the kernel logs an audit record (type=1326) with
the process's host pid and the syscall number; without auditd it goes to the
kernel log. The daemon follows /dev/kmsg from its start and, only for a run
that died by SIGSYS, waits briefly for that record. The kernel rate-limits
these messages, so the name is given "when known": never guessed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections import OrderedDict

import trio

log = logging.getLogger("sandboxd.seccomplog")

KMSG = "/dev/kmsg"
# The record may be printed a little after the process is reaped.
WAIT = 0.1
REMEMBERED = 256
_RECORD = re.compile(rb"type=1326 .*?\bpid=(\d+)\b.*?\bsyscall=(\d+)\b")


class SeccompLog:
    def __init__(self) -> None:
        self._fd: int | None = None
        self._seen: OrderedDict[int, int] = OrderedDict()
        try:
            fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(fd, 0, os.SEEK_END)  # only records from now on
            self._fd = fd
        except OSError as error:
            log.info("cannot follow %s (%s): blocked syscalls will not be named", KMSG, error)

    def _read_available(self) -> None:
        assert self._fd is not None
        while True:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno == errno.EPIPE:  # overwritten before we read it: skip on
                    continue
                raise
            if match := _RECORD.search(record):
                self._seen[int(match.group(1))] = int(match.group(2))
                while len(self._seen) > REMEMBERED:
                    self._seen.popitem(last=False)

    async def syscall_of(self, pid: int) -> int | None:
        """The syscall number seccomp refused to host pid `pid`, if the kernel said so."""
        if self._fd is None:
            return None
        with trio.move_on_after(WAIT):
            while True:
                self._read_available()
                if pid in self._seen:
                    return self._seen.pop(pid)
                await trio.lowlevel.wait_readable(self._fd)
        return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
