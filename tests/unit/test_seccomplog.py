"""The seccomp audit record is read by its fixed fields; what the run chose is ignored."""

from __future__ import annotations

import pytest

from sandboxd.jail.seccomp import describe_call
from sandboxd.seccomplog import BlockedCall, parse_record

X86_64, I386 = 0xC000003E, 0x40000003


def record(comm: str = '"python3"', exe: str = '"/usr/bin/python3.11"', tail: str = "") -> bytes:
    """A /dev/kmsg line as 6.1 and 6.18 print a seccomp kill (no auditd running)."""
    return (
        "5,812,725807938,-;audit: type=1326 audit(1796163523.210:30): auid=4294967295 "
        "uid=5000000 gid=5000000 ses=4294967295 subj=unconfined pid=15579 "
        f"comm={comm} exe={exe} sig=31 arch=c000003e syscall=101 compat=0 "
        f"ip=0x7f28d4067b67 code=0x80000000{tail}"
    ).encode()


def test_a_kernel_record_gives_pid_arch_and_call() -> None:
    assert parse_record(record()) == BlockedCall(pid=15579, arch=X86_64, syscall=101)
    assert parse_record(record()).describe() == "ptrace"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "comm",
    [
        '"x.syscall=1"',  # what prctl(PR_SET_NAME) may set: no space, printed quoted
        '"pid=1.sig=9"',
        "782073797363616C6C3D3120",  # " syscall=1 " has spaces: the kernel prints it in hex
        '"arch=40000003"',
    ],
)
def test_a_chosen_comm_does_not_change_the_named_call(comm: str) -> None:
    assert parse_record(record(comm=comm)) == BlockedCall(15579, X86_64, 101)


def test_a_chosen_exe_does_not_change_the_named_call() -> None:
    exe = '"/tmp/a.sig=31.arch=40000003.syscall=1"'
    assert parse_record(record(exe=exe)) == BlockedCall(15579, X86_64, 101)


def test_fields_out_of_the_kernels_order_are_no_record() -> None:
    forged = record(comm='"x" syscall=1 sig=31')
    assert parse_record(forged) is None


@pytest.mark.parametrize(
    "line",
    [
        b"6,1,2,-;audit: type=1400 audit(1:2): apparmor=DENIED pid=1 comm=x",
        b"6,1,2,-;some other message pid=3 syscall=4",
        b"",
        record().replace(b"syscall=101", b"syscall=x"),
        record().replace(b" arch=c000003e", b""),
    ],
)
def test_other_or_broken_lines_are_no_record(line: bytes) -> None:
    assert parse_record(line) is None


def test_an_i386_number_is_named_in_the_i386_table() -> None:
    i386 = parse_record(record().replace(b"arch=c000003e syscall=101", b"arch=40000003 syscall=20"))
    assert i386 == BlockedCall(15579, I386, 20)
    assert i386.describe() == "getpid (i386 ABI)"  # 20 is writev on x86_64


def test_calls_are_named_for_their_abi() -> None:
    assert describe_call(X86_64, 101) == "ptrace"
    assert describe_call(X86_64, 0x40000000 | 0) == "read (x32 ABI)"
    assert describe_call(I386, 1_000_000) == "number 1000000 (i386 ABI)"
    assert describe_call(0x1234, 5) == "number 5 of unknown ABI 0x1234"
