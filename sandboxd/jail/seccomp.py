"""seccomp allow-lists per language: compiled once in the zygote, loaded in each worker.

The policies below are data. A policy allows a set of system calls outright,
answers a few with an errno, and allows a few more only for some argument
values (ArgRule). Everything else, and every call from a non-native ABI (x32,
i386 on x86_64; arm32 on aarch64), kills the whole process with SIGSYS, which
the daemon reads from waitpid as the `blocked_syscall` verdict.

compile_policy() builds the classic-BPF program with libseccomp (Debian's
python3-seccomp) and returns its bytes; the zygote does that once per language.
load() installs those bytes in the calling process with the seccomp(2) system
call alone: no libseccomp, no allocation that could fail half-way, and it
refuses to run unless PR_SET_NO_NEW_PRIVS is already set.

Arch-specific names: the tables list x86_64 names such as `open`, `stat` or
`arch_prctl` that aarch64 does not have. A name must be a real system call on
at least one supported architecture (x86_64, aarch64), or compilation fails
(a typo cannot silently drop a rule); a real name absent on the running
architecture is skipped, since nothing there can call it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import seccomp

from sandboxd.jail import libc

# ---------------------------------------------------------------------------
# Actions. The default covers every system call no table names.

DEFAULT_ACTION = seccomp.KILL_PROCESS
BAD_ARCH_ACTION = seccomp.KILL_PROCESS

SUPPORTED_ARCHES = (seccomp.Arch.X86_64, seccomp.Arch.AARCH64)

# ---------------------------------------------------------------------------
# Argument values (kernel uapi; identical on x86_64 and aarch64).

# asm-generic/ioctls.h
TCGETS = 0x5401
TIOCSTI = 0x5412  # push bytes into a terminal's input: the classic escape
TIOCGWINSZ = 0x5413
FIONREAD = 0x541B
FIONBIO = 0x5421
FIONCLEX = 0x5450
FIOCLEX = 0x5451

# linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_GET_SECCOMP = 21
PR_CAPBSET_READ = 23
PR_GET_NO_NEW_PRIVS = 39
PR_SET_VMA = 0x53564D41

# linux/socket.h
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10

# Namespace flags that clone() honours. CLONE_NEWTIME (0x80) is absent on
# purpose: in clone() that bit belongs to the exit signal, and the kernel only
# takes it from clone3() and unshare(), both refused.
CLONE_NAMESPACE_FLAGS = (
    libc.CLONE_NEWNS | libc.CLONE_NEWCGROUP | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC
    | libc.CLONE_NEWUSER | libc.CLONE_NEWPID | libc.CLONE_NEWNET
)

LOW_32_BITS = 0xFFFFFFFF  # int arguments: the kernel ignores the high word

# ---------------------------------------------------------------------------
# Policy shape.


@dataclass(frozen=True)
class ArgRule:
    """Allow `syscall` only when (argument `arg` & `mask`) is one of `allowed`.

    Any other value gets `otherwise_errno`, or the default kill when it is None.
    """

    syscall: str
    arg: int
    mask: int
    allowed: tuple[int, ...]
    otherwise_errno: int | None


@dataclass(frozen=True)
class Policy:
    allow: frozenset[str]
    errno: Mapping[str, int] = field(default_factory=dict)
    arg_rules: tuple[ArgRule, ...] = ()

    def allowed_names(self) -> frozenset[str]:
        """Every call this policy lets through for at least some arguments."""
        return self.allow | {rule.syscall for rule in self.arg_rules}


# ---------------------------------------------------------------------------
# Tables.

# Never allowed for any language, whatever the arguments. They fall to the
# default kill; an errno table may answer one with an errno instead where a
# runtime probes it (node: io_uring; numpy's OpenBLAS: mbind), but no table may
# allow one: build_program() refuses.
REFUSED: frozenset[str] = frozenset({
    # kernel attack surface with a history, and nothing a snippet needs
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "userfaultfd", "perf_event_open", "keyctl", "add_key", "request_key",
    "modify_ldt", "lookup_dcookie", "fanotify_init", "kcmp",
    # other processes' memory and file descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "process_madvise",
    # namespaces, mounts and the root directory
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at",
    # identity: the worker dropped to its uid before loading the filter
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "setfsuid", "setfsgid", "capset",
    # the machine itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "syslog", "vhangup", "iopl", "ioperm", "uselib", "nfsservctl", "_sysctl",
    # execution domain and NUMA placement
    "personality", "mbind", "migrate_pages", "move_pages", "set_mempolicy",
    "set_mempolicy_home_node",
    # more filters or a user-space supervisor: not needed inside the jail
    "seccomp",
    # flags live in memory seccomp cannot read (answered ENOSYS, see BASE_ERRNO)
    "clone3",
})

# Allowed for every language: what glibc, CPython 3.11 and node 20 call.
BASE_ALLOW: frozenset[str] = frozenset({
    # memory
    "brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "msync",
    "membarrier",  # JIT runtimes (V8) and glibc's sys_membarrier users
    # threads and scheduling (threading, worker_threads, OpenBLAS/OpenMP pools)
    "futex", "set_robust_list", "set_tid_address", "rseq", "gettid",
    "sched_getaffinity", "sched_setaffinity", "sched_yield", "getcpu",
    "arch_prctl",  # x86_64 TLS set-up by glibc in every new process
    "restart_syscall",  # the kernel restarts interrupted sleeps through it
    # processes (clone is in ARG_RULES)
    "execve",  # node's own start; python's subprocess of the jail's interpreter
    "wait4", "waitid", "exit", "exit_group", "kill", "tgkill", "tkill",
    "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid",
    "getresuid", "getresgid", "getgroups", "getpgrp", "getpgid", "getsid",
    "setpgid", "setsid",  # subprocess's process_group and start_new_session
    "prlimit64", "getrlimit", "setrlimit",  # unprivileged: limits only go down
    "getrusage", "times", "uname", "sysinfo", "umask", "getrandom",
    # time
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "alarm", "setitimer", "getitimer",
    "timer_create", "timer_settime", "timer_gettime", "timer_getoverrun", "timer_delete",
    "timerfd_create", "timerfd_settime", "timerfd_gettime",
    # signals
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend",
    "rt_sigtimedwait", "sigaltstack", "signalfd", "signalfd4", "pause",
    # waiting on descriptors (selectors, asyncio, libuv)
    "poll", "ppoll", "select", "pselect6",
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    "eventfd", "eventfd2",
    # descriptors and reading files (imports, require)
    "read", "readv", "pread64", "preadv", "preadv2",
    "write", "writev", "pwrite64", "pwritev", "pwritev2",
    "open", "openat", "creat", "close", "close_range", "lseek", "fcntl", "flock",
    "dup", "dup2", "dup3", "pipe", "pipe2",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs",
    "access", "faccessat", "faccessat2", "readlink", "readlinkat",
    "getdents", "getdents64", "getcwd", "chdir", "fchdir",
    # writing files in the private /tmp and working directory
    "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat",
    "utimes", "utimensat", "futimesat", "truncate", "ftruncate", "fallocate", "fadvise64",
    "fsync", "fdatasync",
    "mknod", "mknodat",  # os.mkfifo; device nodes need CAP_MKNOD, which the worker lacks
    "memfd_create", "sendfile", "copy_file_range",
    # extended attributes: shutil.copy2 copies them
    "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    # sockets (socket and socketpair are in ARG_RULES; the network namespace decides reach)
    "bind", "listen", "accept", "accept4", "connect", "getsockname", "getpeername",
    "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown",
    "setsockopt", "getsockopt",
})

# Answered with an errno for every language.
BASE_ERRNO: Mapping[str, int] = {
    "clone3": errno.ENOSYS,  # glibc then falls back to clone, whose flags we can check
    "mbind": errno.EPERM,  # OpenBLAS (numpy) binds its buffers to the local node, ignoring errors
}

# Allowed for some argument values only, for every language.
ARG_RULES: tuple[ArgRule, ...] = (
    # threads and fork, never new namespaces
    ArgRule("clone", 0, CLONE_NAMESPACE_FLAGS, (0,), None),
    # terminal and descriptor queries; anything else (TIOCSTI among them) gets
    # EPERM, so libraries that probe terminals fail softly
    ArgRule("ioctl", 1, LOW_32_BITS, (
        TCGETS,  # isatty() in CPython and libuv
        TIOCGWINSZ,  # shutil.get_terminal_size, process.stdout.columns
        FIONREAD,  # bytes waiting on a pipe or socket
        FIONBIO,  # libuv and CPython set O_NONBLOCK this way
        FIOCLEX, FIONCLEX,  # os.set_inheritable
    ), errno.EPERM),
    ArgRule("socket", 0, LOW_32_BITS, (AF_UNIX, AF_INET, AF_INET6), errno.EAFNOSUPPORT),
    ArgRule("socketpair", 0, LOW_32_BITS, (AF_UNIX,), errno.EAFNOSUPPORT),
    ArgRule("prctl", 0, LOW_32_BITS, (
        PR_SET_NAME, PR_GET_NAME,  # thread names (pthread_setname_np on itself)
        PR_SET_VMA,  # glibc and V8 name anonymous mappings
        PR_SET_PDEATHSIG, PR_GET_PDEATHSIG, PR_GET_DUMPABLE,
        PR_GET_SECCOMP, PR_GET_NO_NEW_PRIVS, PR_CAPBSET_READ,  # read-only probes
    ), errno.EPERM),
)

PYTHON3_ALLOW: frozenset[str] = frozenset({
    "vfork",  # subprocess: _posixsubprocess uses vfork() since 3.10
})

NODEJS_ALLOW: frozenset[str] = frozenset({
    "capget",  # node checks its capabilities at start-up
    "pkey_alloc", "pkey_free", "pkey_mprotect",  # V8 memory protection keys
})

NODEJS_ERRNO: Mapping[str, int] = {
    # libuv probes io_uring and falls back to its thread pool on ENOSYS
    "io_uring_setup": errno.ENOSYS,
    "io_uring_enter": errno.ENOSYS,
    "io_uring_register": errno.ENOSYS,
}

POLICIES: Mapping[str, Policy] = {
    "python3": Policy(allow=BASE_ALLOW | PYTHON3_ALLOW, errno=BASE_ERRNO, arg_rules=ARG_RULES),
    "nodejs": Policy(
        allow=BASE_ALLOW | NODEJS_ALLOW,
        errno={**BASE_ERRNO, **NODEJS_ERRNO},
        arg_rules=ARG_RULES,
    ),
}

# ---------------------------------------------------------------------------
# Compilation (zygote side).


class UnknownSyscallError(ValueError):
    """A table names something that is no system call on any supported architecture."""


def _native_number(name: str) -> int | None:
    """The running architecture's number for `name`, None when it has no such call."""
    number = int(seccomp.resolve_syscall(seccomp.Arch.NATIVE, name))
    if number >= 0:
        return number
    if any(int(seccomp.resolve_syscall(arch, name)) >= 0 for arch in SUPPORTED_ARCHES):
        return None
    raise UnknownSyscallError(f"unknown system call {name!r} in a seccomp table")


def check_names(names: Iterable[str]) -> None:
    """Raise UnknownSyscallError if any name is no system call on a supported arch."""
    for name in names:
        _native_number(name)


def _check_policy(policy: Policy) -> None:
    check_names(policy.allowed_names() | policy.errno.keys())
    refused = policy.allowed_names() & REFUSED
    if refused:
        raise ValueError(f"refused system calls allowed by a policy: {sorted(refused)}")
    conditional = {rule.syscall for rule in policy.arg_rules}
    unconditional = policy.allow | policy.errno.keys()
    twice = (policy.allow & policy.errno.keys()) | (conditional & unconditional)
    if twice:
        raise ValueError(f"system calls with more than one rule: {sorted(twice)}")


def _add_arg_rule(program: seccomp.SyscallFilter, rule: ArgRule) -> None:
    for value in rule.allowed:
        allowed = seccomp.Arg(rule.arg, seccomp.MASKED_EQ, rule.mask, value)
        program.add_rule(seccomp.ALLOW, rule.syscall, allowed)
    if rule.otherwise_errno is None:
        return
    # An unconditional rule would replace the conditional ones in libseccomp, so
    # "any other value" is two rules that together cover every 64-bit value. The
    # allow rules above are tried first (tests/unit/test_seccomp_policy.py runs
    # the compiled program to check it).
    action = seccomp.ERRNO(rule.otherwise_errno)
    high_word_zero = seccomp.Arg(rule.arg, seccomp.MASKED_EQ, 0xFFFFFFFF_00000000, 0)
    program.add_rule(action, rule.syscall, high_word_zero)
    program.add_rule(action, rule.syscall, seccomp.Arg(rule.arg, seccomp.GT, 0xFFFFFFFF))


def build_program(policy: Policy) -> bytes:
    """The BPF program (struct sock_filter array, native byte order) for a policy."""
    _check_policy(policy)
    program = seccomp.SyscallFilter(DEFAULT_ACTION)
    program.set_attr(seccomp.Attr.ACT_BADARCH, BAD_ARCH_ACTION)
    for name in sorted(policy.allow):
        if _native_number(name) is not None:
            program.add_rule(seccomp.ALLOW, name)
    for name, error in sorted(policy.errno.items()):
        if _native_number(name) is not None:
            program.add_rule(seccomp.ERRNO(error), name)
    for rule in policy.arg_rules:
        if _native_number(rule.syscall) is not None:
            _add_arg_rule(program, rule)
    fd = os.memfd_create("sandboxd-seccomp", os.MFD_CLOEXEC)
    with open(fd, "wb") as out:
        program.export_bpf(out)
        return os.pread(fd, os.fstat(fd).st_size, 0)


def compile_policy(language: str) -> bytes:
    """The BPF program for a language ("python3" or "nodejs"); call once, load many times."""
    try:
        policy = POLICIES[language]
    except KeyError:
        raise ValueError(f"no seccomp policy for language {language!r}") from None
    return build_program(policy)


def syscall_name(number: int) -> str | None:
    """The native name of a system call number, for messages; None if unknown."""
    try:
        name = seccomp.resolve_syscall(seccomp.Arch.NATIVE, number)
    except ValueError:
        return None
    return bytes(name).decode()


# ---------------------------------------------------------------------------
# Loading (worker side): one seccomp(2) call, no libseccomp.

_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1  # every thread gets the filter, or the call fails
_BPF_MAXINSNS = 4096
_SOCK_FILTER_SIZE = 8
_NR_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load(program: bytes) -> None:
    """Install a compiled program in the calling process (all its threads).

    The caller must have set PR_SET_NO_NEW_PRIVS. Raises OSError if the kernel
    refuses; the filter is then not installed at all.
    """
    count, remainder = divmod(len(program), _SOCK_FILTER_SIZE)
    if remainder or not 0 < count <= _BPF_MAXINSNS:
        raise ValueError(f"not a BPF program: {len(program)} bytes")
    if _NR_SECCOMP is None:
        raise OSError(errno.ENOSYS, f"seccomp: unsupported machine {os.uname().machine}")
    if libc.prctl(PR_GET_NO_NEW_PRIVS) != 1:
        raise PermissionError(errno.EPERM, "seccomp: PR_SET_NO_NEW_PRIVS must be set first")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(count, ctypes.addressof(buffer))
    result = _syscall(
        _NR_SECCOMP, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, ctypes.addressof(fprog)
    )
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")
    if result != 0:
        raise OSError(errno.EBUSY, f"seccomp: thread {result} could not take the filter")
