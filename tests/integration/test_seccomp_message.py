"""The blocked-syscall message names the call the kernel's audit record names.

The kernel rate-limits these records (and every test daemon on the machine
produces them), and its audit thread prints them a little after the kill, so a
run's message may be missing: it is given only when known. Each test repeats
the run until one answer has a message, and every answer must be the right
verdict with the right name or none.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.conftest import Daemon

ATTEMPTS = 8
# The kernel prints at most 10 audit records per 5 s machine-wide (printk_ratelimit)
# and every test daemon on the machine competes for them: attempts are spread out
# so that they fall into more than one window.
SPACING = 1.0

# comm is the run's to choose: a name that holds a field of the record.
SPOOFED_COMM = """
import ctypes, os
ctypes.CDLL(None).prctl(15, b"x.syscall=1", 0, 0, 0)  # PR_SET_NAME
os.setuid(0)
"""
# An i386 system call (int 0x80) from a 64-bit run: eax=20 is getpid in the i386
# table and writev in the x86_64 one.
I386_CALL = """
import ctypes, mmap
code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
ctypes.CFUNCTYPE(ctypes.c_int)(address)()
"""


def named(daemon: Daemon, code: str) -> list[dict[str, Any]]:
    """Answers to `code` until one names a call (at most ATTEMPTS)."""
    answers = []
    for _ in range(ATTEMPTS):
        answer = daemon.run(code)
        answers.append(answer)
        assert answer["status"] == "blocked_syscall", answer
        if answer.get("message"):
            break
        time.sleep(SPACING)
    return answers


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (SPOOFED_COMM, "blocked system call setuid"),
        (I386_CALL, "blocked system call getpid (i386 ABI)"),
    ],
    ids=["spoofed-comm", "i386"],
)
def test_the_named_call_is_the_one_the_kernel_refused(
    daemon: Daemon, code: str, message: str
) -> None:
    answers = named(daemon, code)
    messages = {answer.get("message") for answer in answers}
    assert messages <= {None, message}, answers
    assert message in messages, answers
    daemon.assert_healthy()
