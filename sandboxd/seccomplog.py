"""Which system call a seccomp kill refused, from the kernel's own audit record.

When seccomp kills a process the kernel logs an audit record (type=1326) with
the process's host pid and the syscall number; without auditd it goes to the
kernel log. The daemon follows /dev/kmsg from its start and, only for a run
that died by SIGSYS, waits briefly for that record. The kernel rate-limits
these messages, so the name is given "when known": never guessed.

A record reads (kernel/auditsc.c, audit_log_seccomp):
  audit: type=1326 audit(T:N): auid=.. uid=.. gid=.. ses=.. [subj=..] pid=P
  comm="..." exe="..." sig=S arch=A syscall=N compat=C ip=0x.. code=0x..
`comm` and `exe` are the run's to choose (prctl(PR_SET_NAME), execve of a file
it named), so a record is parsed by its fixed fields only: the kernel prints
those two untrusted strings quoted when they hold no space, quote or control
byte and in hex otherwise, so no space-separated token of a record comes from
the run. `pid` is the one before `comm`; `arch` and `syscall` the ones after
`sig`. The number is named for the record's ABI (seccomp.describe_call).
"""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict

import msgspec
import trio

from sandboxd.jail import seccomp

log = logging.getLogger("sandboxd.seccomplog")

KMSG = "/dev/kmsg"
# The record may be printed a little after the process is reaped: the kernel's audit
# thread prints it, later still on a loaded machine.
WAIT = 0.25
REMEMBERED = 256
_TYPE = b" type=1326 "


class BlockedCall(msgspec.Struct, frozen=True):
    """What one seccomp audit record says: who, and which call of which ABI."""

    pid: int
    arch: int
    syscall: int

    def describe(self) -> str:
        return seccomp.describe_call(self.arch, self.syscall)


def parse_record(record: bytes) -> BlockedCall | None:
    """The fixed fields of a seccomp audit record (a /dev/kmsg line), None if it is not
    one or does not have them in the kernel's order."""
    start = record.find(_TYPE)
    if start < 0:
        return None
    tokens = record[start:].split()
    keys = [token.partition(b"=")[0] for token in tokens]
    try:
        pid_at = keys.index(b"pid")
        sig_at = keys.index(b"sig", pid_at)
    except ValueError:
        return None
    if keys[pid_at + 1 : sig_at] != [b"comm", b"exe"] or keys[sig_at + 1 : sig_at + 3] != [
        b"arch",
        b"syscall",
    ]:
        return None
    try:
        pid = int(tokens[pid_at][4:], 10)
        arch = int(tokens[sig_at + 1][5:], 16)
        number = int(tokens[sig_at + 2][8:], 10)
    except ValueError:
        return None
    return BlockedCall(pid, arch, number)


class SeccompLog:
    def __init__(self) -> None:
        self._fd: int | None = None
        self._seen: OrderedDict[int, BlockedCall] = OrderedDict()
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
            if (call := parse_record(record)) is not None:
                self._seen[call.pid] = call
                while len(self._seen) > REMEMBERED:
                    self._seen.popitem(last=False)

    async def syscall_of(self, pid: int) -> BlockedCall | None:
        """The call seccomp refused to host pid `pid`, if the kernel said so."""
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
