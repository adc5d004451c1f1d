"""The seccomp tables, and the compiled programs run through a classic-BPF evaluator.

No root and no kernel filter here: `verdict` executes the exact bytes that
load() would hand to the kernel, for a given architecture, system call number
and arguments, so every claim about the policies is checked on the program.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
import seccomp as libseccomp

from sandboxd.jail import libc
from sandboxd.jail import seccomp as policy_module
from sandboxd.jail.seccomp import (
    ARG_RULES,
    POLICIES,
    REFUSED,
    TCGETS,
    TIOCGWINSZ,
    TIOCSTI,
    Policy,
    UnknownSyscallError,
    build_program,
    check_names,
    compile_policy,
    syscall_name,
)

LANGUAGES = sorted(POLICIES)

# seccomp return values (linux/seccomp.h)
KILL_PROCESS = 0x80000000
ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000

AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000
NATIVE_ARCH = int(libseccomp.system_arch())


def errno_verdict(error: int) -> int:
    return RET_ERRNO | error


def nr(name: str) -> int:
    return int(libseccomp.resolve_syscall(libseccomp.Arch.NATIVE, name))


def verdict(
    program: bytes, number: int, args: tuple[int, ...] = (), arch: int = NATIVE_ARCH
) -> int:
    """Run a seccomp BPF program on one struct seccomp_data; return its SECCOMP_RET_* value."""
    padded = (*args, *(0,) * (6 - len(args)))
    data = struct.pack("=IIQ6Q", number, arch, 0, *padded)
    accumulator = 0
    pc = 0
    while True:
        code, jump_true, jump_false, k = struct.unpack_from("=HBBI", program, pc * 8)
        pc += 1
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            accumulator = struct.unpack_from("=I", data, k)[0]
        elif code == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            accumulator &= k
        elif code == 0x05:  # BPF_JMP | BPF_JA
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):  # BPF_JMP | JEQ, JGT, JGE, JSET | BPF_K
            taken = {
                0x15: accumulator == k,
                0x25: accumulator > k,
                0x35: accumulator >= k,
                0x45: bool(accumulator & k),
            }[code]
            pc += jump_true if taken else jump_false
        elif code == 0x06:  # BPF_RET | BPF_K
            return int(k)
        else:
            raise AssertionError(f"opcode {code:#x} not handled by this evaluator")


@pytest.fixture(scope="module", params=LANGUAGES)
def language(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def program(language: str) -> bytes:
    return compile_policy(language)


# --- the tables ----------------------------------------------------------------------


def test_refused_calls_are_never_allowed_by_any_language(language: str) -> None:
    assert POLICIES[language].allowed_names() & REFUSED == frozenset()


def test_every_name_in_every_table_is_a_real_system_call() -> None:
    check_names(REFUSED)
    for policy in POLICIES.values():
        check_names(policy.allowed_names() | policy.errno.keys())


def test_only_the_native_architectures_are_supported() -> None:
    supported = set(policy_module.SUPPORTED_ARCHES)
    assert supported == {libseccomp.Arch.X86_64, libseccomp.Arch.AARCH64}
    assert not supported & {libseccomp.Arch.X32, libseccomp.Arch.X86, libseccomp.Arch.ARM}


def test_clone_rule_masks_every_namespace_flag_and_wants_none() -> None:
    (clone,) = (rule for rule in ARG_RULES if rule.syscall == "clone")
    namespace_flags = libc.NAMESPACE_FLAGS & ~libc.CLONE_NEWTIME
    assert (clone.arg, clone.mask, clone.allowed) == (0, namespace_flags, (0,))
    assert clone.otherwise_errno is None


def test_io_uring_is_killed_for_python_and_answered_enosys_for_node() -> None:
    io_uring = {"io_uring_setup", "io_uring_enter", "io_uring_register"}
    assert io_uring <= REFUSED
    assert not io_uring & POLICIES["python3"].errno.keys()
    assert {name: POLICIES["nodejs"].errno[name] for name in io_uring} == dict.fromkeys(
        io_uring, errno.ENOSYS
    )


# --- building ------------------------------------------------------------------------


def test_compile_policy_returns_whole_bpf_instructions(program: bytes) -> None:
    assert 0 < len(program) <= 4096 * 8
    assert len(program) % 8 == 0


def test_an_unknown_name_is_an_error_not_a_dropped_rule() -> None:
    with pytest.raises(UnknownSyscallError, match="getpidd"):
        build_program(Policy(allow=frozenset({"getpid", "getpidd"})))


def test_a_name_of_an_unsupported_architecture_is_an_error() -> None:
    with pytest.raises(UnknownSyscallError, match="socketcall"):
        build_program(Policy(allow=frozenset({"socketcall"})))  # i386 and arm32 only


def test_a_name_absent_on_this_architecture_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with_i386 = (libseccomp.Arch.NATIVE, libseccomp.Arch.X86)
    monkeypatch.setattr(policy_module, "SUPPORTED_ARCHES", with_i386)
    program = build_program(Policy(allow=frozenset({"getpid", "socketcall"})))
    assert verdict(program, nr("getpid")) == ALLOW


def test_a_policy_that_allows_a_refused_call_does_not_build() -> None:
    with pytest.raises(ValueError, match="ptrace"):
        build_program(Policy(allow=frozenset({"getpid", "ptrace"})))


def test_a_call_with_two_rules_does_not_build() -> None:
    with pytest.raises(ValueError, match="getpid"):
        build_program(Policy(allow=frozenset({"getpid"}), errno={"getpid": errno.EPERM}))


def test_an_unknown_language_has_no_policy() -> None:
    with pytest.raises(ValueError, match="ruby"):
        compile_policy("ruby")


def test_syscall_name_names_native_numbers_only() -> None:
    assert syscall_name(nr("io_uring_setup")) == "io_uring_setup"
    assert syscall_name(1_000_000) is None


# --- the compiled programs -----------------------------------------------------------


def test_every_listed_call_is_allowed(language: str, program: bytes) -> None:
    native = {name for name in POLICIES[language].allow if nr(name) >= 0}
    refused = {name for name in native if verdict(program, nr(name)) != ALLOW}
    assert refused == set()


def test_every_refused_call_is_killed_or_answered_with_its_errno(
    language: str, program: bytes
) -> None:
    answers = POLICIES[language].errno
    native = {name for name in REFUSED if nr(name) >= 0}
    got = {name: verdict(program, nr(name)) for name in native}
    expected = {
        name: errno_verdict(answers[name]) if name in answers else KILL_PROCESS for name in native
    }
    assert got == expected


def test_python_is_killed_on_io_uring() -> None:
    assert verdict(compile_policy("python3"), nr("io_uring_setup")) == KILL_PROCESS


def test_node_gets_enosys_from_io_uring() -> None:
    assert verdict(compile_policy("nodejs"), nr("io_uring_setup")) == errno_verdict(errno.ENOSYS)


def test_an_unlisted_call_kills(program: bytes) -> None:
    assert verdict(program, nr("inotify_init1")) == KILL_PROCESS


def test_foreign_abis_are_killed(program: bytes) -> None:
    assert verdict(program, nr("getpid")) == ALLOW
    assert verdict(program, nr("getpid"), arch=AUDIT_ARCH_I386) == KILL_PROCESS
    if os.uname().machine == "x86_64":
        assert verdict(program, nr("getpid") | X32_SYSCALL_BIT) == KILL_PROCESS


def test_clone_for_threads_and_fork_is_allowed(program: bytes) -> None:
    thread_flags = 0x3D0F00  # what glibc's pthread_create passes
    fork_flags = 0x01200011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
    assert verdict(program, nr("clone"), (thread_flags,)) == ALLOW
    assert verdict(program, nr("clone"), (fork_flags,)) == ALLOW


@pytest.mark.parametrize(
    "flag",
    [libc.CLONE_NEWNS, libc.CLONE_NEWCGROUP, libc.CLONE_NEWUTS, libc.CLONE_NEWIPC,
     libc.CLONE_NEWUSER, libc.CLONE_NEWPID, libc.CLONE_NEWNET],
)
def test_clone_with_a_namespace_flag_is_killed(program: bytes, flag: int) -> None:
    assert verdict(program, nr("clone"), (flag | 0x11,)) == KILL_PROCESS


def test_clone3_answers_enosys_so_glibc_falls_back_to_clone(program: bytes) -> None:
    assert verdict(program, nr("clone3")) == errno_verdict(errno.ENOSYS)


@pytest.mark.parametrize("high_word", [0, 1 << 32, 0xFFFFFFFF << 32])
def test_ioctl_is_judged_on_its_32_bit_command(program: bytes, high_word: int) -> None:
    ioctl = nr("ioctl")
    assert verdict(program, ioctl, (0, high_word | TCGETS)) == ALLOW
    assert verdict(program, ioctl, (0, high_word | TIOCGWINSZ)) == ALLOW
    assert verdict(program, ioctl, (0, high_word | TIOCSTI)) == errno_verdict(errno.EPERM)


def test_sockets_are_unix_and_ip_only(program: bytes) -> None:
    af_unix, af_inet, af_inet6, af_netlink, af_packet = 1, 2, 10, 16, 17
    for family in (af_unix, af_inet, af_inet6):
        assert verdict(program, nr("socket"), (family, 1)) == ALLOW
    for family in (af_netlink, af_packet, (1 << 32) | af_packet):
        assert verdict(program, nr("socket"), (family, 3)) == errno_verdict(errno.EAFNOSUPPORT)
    assert verdict(program, nr("socketpair"), (af_unix, 1)) == ALLOW
    assert verdict(program, nr("socketpair"), (af_inet, 1)) == errno_verdict(errno.EAFNOSUPPORT)


def test_prctl_is_limited_to_a_few_options(program: bytes) -> None:
    pr_set_name, pr_set_dumpable, pr_set_seccomp, pr_set_mm = 15, 4, 22, 35
    assert verdict(program, nr("prctl"), (pr_set_name,)) == ALLOW
    for option in (pr_set_dumpable, pr_set_seccomp, pr_set_mm):
        assert verdict(program, nr("prctl"), (option,)) == errno_verdict(errno.EPERM)
