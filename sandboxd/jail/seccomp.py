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

# linux/socket.h (and linux/net.h for the types)
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_SEQPACKET = 5
SOCK_TYPE_MASK = 0xF  # the rest of the type argument is SOCK_NONBLOCK | SOCK_CLOEXEC

# Namespace flags that clone() honours. CLONE_NEWTIME (0x80) is absent on
# purpose: in clone() that bit belongs to the exit signal, and the kernel only
# takes it from clone3() and unshare(), both refused.
CLONE_NAMESPACE_FLAGS = (
    libc.CLONE_NEWNS | libc.CLONE_NEWCGROUP | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC
    | libc.CLONE_NEWUSER | libc.CLONE_NEWPID | libc.CLONE_NEWNET
)

# asm-generic/fcntl.h and linux/fcntl.h: the commands a run may give fcntl().
F_DUPFD = 0
F_GETFD = 1
F_SETFD = 2
F_GETFL = 3
F_SETFL = 4
F_DUPFD_CLOEXEC = 1030
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
F_ADD_SEALS = 1033
F_GET_SEALS = 1034

# fadvise64 advice (linux/fadvise.h, 64-bit ABIs)
POSIX_FADV_NORMAL, POSIX_FADV_RANDOM, POSIX_FADV_SEQUENTIAL = 0, 1, 2
POSIX_FADV_WILLNEED, POSIX_FADV_DONTNEED, POSIX_FADV_NOREUSE = 3, 4, 5

# madvise advice (asm-generic/mman-common.h), all but MADV_COLD (20), MADV_PAGEOUT (21)
# and the CAP_SYS_ADMIN ones (MADV_HWPOISON 100, MADV_SOFT_OFFLINE 101)
MADV_KEPT = (
    0, 1, 2, 3, 4,  # NORMAL, RANDOM, SEQUENTIAL, WILLNEED, DONTNEED
    8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,  # FREE ... KEEPONFORK
    22, 23, 24, 25,  # POPULATE_READ, POPULATE_WRITE, DONTNEED_LOCKED, COLLAPSE
    102, 103,  # GUARD_INSTALL, GUARD_REMOVE
)  # fmt: skip

LOW_32_BITS = 0xFFFFFFFF  # int arguments: the kernel ignores the high word

# ---------------------------------------------------------------------------
# Policy shape.


@dataclass(frozen=True)
class ArgRule:
    """Allow `syscall` only when (argument `arg` & `mask`) is one of `allowed`.

    Any other value gets `otherwise_errno`, or the default kill when it is None.
    `also` adds (argument, value) conditions, exact 64-bit equality, that an allowed
    call must meet as well; a rule with `also` needs an errno and a small mask (every
    masked value outside `allowed` gets its own errno rule).
    """

    syscall: str
    arg: int
    mask: int
    allowed: tuple[int, ...]
    otherwise_errno: int | None
    also: tuple[tuple[int, int], ...] = ()


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
    "brk", "mmap", "munmap", "mprotect", "mremap", "msync",  # madvise: ARG_RULES
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
    "open", "openat", "creat", "close", "close_range", "lseek",  # fcntl: ARG_RULES
    "dup", "dup2", "dup3", "pipe", "pipe2",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs",
    "access", "faccessat", "faccessat2", "readlink", "readlinkat",
    "getdents", "getdents64", "getcwd", "chdir", "fchdir",
    # writing files in the private /tmp and working directory
    "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat",
    "utimes", "utimensat", "futimesat", "truncate", "ftruncate", "fallocate",
    "fsync", "fdatasync",
    "mknod", "mknodat",  # os.mkfifo; device nodes need CAP_MKNOD, which the worker lacks
    "memfd_create", "sendfile", "copy_file_range",
    # extended attributes: shutil.copy2 copies them
    "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    # sockets (socket, socketpair, bind and listen: see the *_SOCKET_* tables below)
    "accept", "accept4", "connect", "getsockname", "getpeername",
    "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown",
    "setsockopt", "getsockopt",
})

# Answered with an errno for every language.
BASE_ERRNO: Mapping[str, int] = {
    "clone3": errno.ENOSYS,  # glibc then falls back to clone, whose flags we can check
    "mbind": errno.EPERM,  # OpenBLAS (numpy) binds its buffers to the local node, ignoring errors
    # Channels between concurrent runs through the read-only tree they share (its
    # inodes are the same in every worker): a lock, or a watch that reports another
    # run's opens, on a stdlib file. seccomp cannot tell a run's own /tmp file from
    # a shared one, so these answer ENOSYS everywhere: "not implemented here" makes
    # libraries take their fallback (py-filelock says to use SoftFileLock; file
    # watchers poll). fcntl's locks, leases and dnotify: see ARG_RULES.
    "flock": errno.ENOSYS,
    "inotify_init": errno.ENOSYS,
    "inotify_init1": errno.ENOSYS,
    "inotify_add_watch": errno.ENOSYS,
    "inotify_rm_watch": errno.ENOSYS,
    "fanotify_init": errno.ENOSYS,  # unprivileged inode marks report opens too (5.13+)
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
    # descriptor flags, pipe sizes and memfd seals only; every lock (POSIX, OFD),
    # lease and dnotify command gets ENOSYS, for the reason given at "flock"
    ArgRule("fcntl", 1, LOW_32_BITS, (
        F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL, F_SETFL,
        F_GETPIPE_SZ, F_SETPIPE_SZ, F_ADD_SEALS, F_GET_SEALS,
    ), errno.ENOSYS),
    # the page cache of the shared read-only files: a run that could evict their pages
    # and time its reads learns which pages another run read (a channel of hundreds of
    # bits a second, shown by test_redteam_channels.py), so no eviction on demand
    ArgRule("fadvise64", 3, LOW_32_BITS, (
        POSIX_FADV_NORMAL, POSIX_FADV_RANDOM, POSIX_FADV_SEQUENTIAL,
        POSIX_FADV_WILLNEED, POSIX_FADV_NOREUSE,
    ), errno.EINVAL),
    ArgRule("madvise", 2, LOW_32_BITS, MADV_KEPT, errno.EINVAL),
    ArgRule("prctl", 0, LOW_32_BITS, (
        PR_SET_NAME, PR_GET_NAME,  # thread names (pthread_setname_np on itself)
        PR_SET_VMA,  # glibc and V8 name anonymous mappings
        PR_SET_PDEATHSIG, PR_GET_PDEATHSIG, PR_GET_DUMPABLE,
        PR_GET_SECCOMP, PR_GET_NO_NEW_PRIVS, PR_CAPBSET_READ,  # read-only probes
    ), errno.EPERM),
)

# Sockets of a run without network: it sits alone in a network namespace of its own
# (jail/namespaces.py), so its Unix, TCP and UDP sockets reach no other run.
OFFLINE_SOCKET_RULES: tuple[ArgRule, ...] = (
    ArgRule("socket", 0, LOW_32_BITS, (AF_UNIX, AF_INET, AF_INET6), errno.EAFNOSUPPORT),
    ArgRule("socketpair", 0, LOW_32_BITS, (AF_UNIX,), errno.EAFNOSUPPORT),
)
OFFLINE_SOCKET_ALLOW: frozenset[str] = frozenset({"bind", "listen"})

# Sockets of a run with network: every network run shares the egress namespace, whose
# abstract Unix names and ports every other network run would see. So, EACCES for:
# - socket(AF_UNIX): no named Unix socket at all (abstract names are per namespace);
# - socketpair other than stream or seqpacket: one end of a datagram pair, dissolved by
#   connect(AF_UNSPEC) and autobound to an abstract name (SO_PASSCRED), takes datagrams
#   (and fds) from any run that finds the name by scanning;
# - bind and listen: no run takes a port another would see (EADDRINUSE) or serves one.
#   Clients are unaffected: connect() picks an ephemeral port by itself.
# Loopback and the namespace's own address are closed by its nft input chain
# (jail/network.py NAMESPACE_RULES: no new connection or datagram is accepted).
EGRESS_SOCKET_RULES: tuple[ArgRule, ...] = (
    ArgRule("socket", 0, LOW_32_BITS, (AF_INET, AF_INET6), errno.EACCES),
    ArgRule("socketpair", 1, SOCK_TYPE_MASK, (SOCK_STREAM, SOCK_SEQPACKET), errno.EACCES,
            also=((0, AF_UNIX),)),
)  # fmt: skip
EGRESS_SOCKET_ERRNO: Mapping[str, int] = {"bind": errno.EACCES, "listen": errno.EACCES}

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

LANGUAGE_ALLOW: Mapping[str, frozenset[str]] = {
    "python3": PYTHON3_ALLOW,
    "nodejs": NODEJS_ALLOW,
}
LANGUAGE_ERRNO: Mapping[str, Mapping[str, int]] = {
    "python3": {},
    "nodejs": NODEJS_ERRNO,
}

# Runs without network (the default).
POLICIES: Mapping[str, Policy] = {
    language: Policy(
        allow=BASE_ALLOW | OFFLINE_SOCKET_ALLOW | LANGUAGE_ALLOW[language],
        errno={**BASE_ERRNO, **LANGUAGE_ERRNO[language]},
        arg_rules=ARG_RULES + OFFLINE_SOCKET_RULES,
    )
    for language in LANGUAGE_ALLOW
}

# Runs with network ([network] mode = "allow" and enable_network).
NETWORK_POLICIES: Mapping[str, Policy] = {
    language: Policy(
        allow=BASE_ALLOW | LANGUAGE_ALLOW[language],
        errno={**BASE_ERRNO, **EGRESS_SOCKET_ERRNO, **LANGUAGE_ERRNO[language]},
        arg_rules=ARG_RULES + EGRESS_SOCKET_RULES,
    )
    for language in LANGUAGE_ALLOW
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
    also = [seccomp.Arg(arg, seccomp.EQ, value) for arg, value in rule.also]
    for value in rule.allowed:
        allowed = seccomp.Arg(rule.arg, seccomp.MASKED_EQ, rule.mask, value)
        program.add_rule(seccomp.ALLOW, rule.syscall, allowed, *also)
    if rule.also:
        _add_complement(program, rule, also)
        return
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


def _add_complement(
    program: seccomp.SyscallFilter, rule: ArgRule, also: list[seccomp.Arg]
) -> None:
    """The errno rules of an ArgRule with `also`, as disjoint cases: a shorter rule that
    overlaps a longer one would win over it in libseccomp, so none may overlap."""
    if rule.otherwise_errno is None or rule.mask > 0xFF:
        raise ValueError(f"the {rule.syscall} rule with `also` needs an errno and a small mask")
    action = seccomp.ERRNO(rule.otherwise_errno)
    for arg, value in rule.also:
        program.add_rule(action, rule.syscall, seccomp.Arg(arg, seccomp.NE, value))
    for value in range(rule.mask + 1):
        if value & rule.mask == value and value not in rule.allowed:
            masked = seccomp.Arg(rule.arg, seccomp.MASKED_EQ, rule.mask, value)
            program.add_rule(action, rule.syscall, masked, *also)


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


# ---------------------------------------------------------------------------
# Calls the host admin adds ([python3] / [nodejs] extra_syscalls, ALLOWED_SYSCALLS).
# They join a policy's allow set; they never replace it, and never reach REFUSED.


def extra_syscall_problem(name: str) -> str | None:
    """Why `name` cannot be added to an allow-list, or None when it can."""
    if name in REFUSED:
        return f"{name!r} is refused for every language (sandboxd.jail.seccomp.REFUSED)"
    try:
        check_names([name])
    except UnknownSyscallError:
        return f"{name!r} is no system call on x86_64 or aarch64"
    return None


def syscall_from_text(text: str) -> str:
    """A name as given, or the native name of a number ("217" -> "getdents64" on x86_64).

    A number the running architecture does not know stays as its digits, which
    extra_syscall_problem() then reports as no system call.
    """
    text = text.strip()
    if text.isascii() and text.isdigit():
        return syscall_name(int(text)) or text
    return text


def with_extra(policy: Policy, extra: Iterable[str]) -> Policy:
    """policy plus `extra` allowed outright; names a rule already covers stay as they are.

    A call with an argument rule (clone, ioctl, socket, prctl...) keeps that rule: an
    extra name cannot widen it to every argument.
    """
    covered = policy.allowed_names() | policy.errno.keys()
    added = frozenset(extra) - covered
    return Policy(allow=policy.allow | added, errno=policy.errno, arg_rules=policy.arg_rules)


def policy_for(language: str, extra: Iterable[str] = (), network: bool = False) -> Policy:
    """The policy of a language ("python3" or "nodejs") for runs without or with network,
    with the admin's extra calls."""
    try:
        policy = (NETWORK_POLICIES if network else POLICIES)[language]
    except KeyError:
        raise ValueError(f"no seccomp policy for language {language!r}") from None
    return with_extra(policy, extra)


def compile_policy(language: str, extra: Iterable[str] = (), network: bool = False) -> bytes:
    """The BPF program for a language plus extra calls, for runs without or with network;
    call once, load many times."""
    return build_program(policy_for(language, extra, network))


# The AUDIT_ARCH_* value an audit record names each ABI by (linux/audit.h), with
# the name a message gives it (None: the running machine's own ABI).
AUDIT_ARCHES: Mapping[int, tuple[seccomp.Arch, str]] = {
    0xC000003E: (seccomp.Arch.X86_64, "x86_64"),
    0x40000003: (seccomp.Arch.X86, "i386"),
    0xC00000B7: (seccomp.Arch.AARCH64, "aarch64"),
    0x40000028: (seccomp.Arch.ARM, "arm"),
}
_X32_BIT = 0x40000000  # x32 calls are x86_64's arch with this bit in the number


def syscall_name(number: int, arch: seccomp.Arch = seccomp.Arch.NATIVE) -> str | None:
    """The name of system call `number` of ABI `arch`, for messages; None if unknown."""
    try:
        name = seccomp.resolve_syscall(arch, number)
    except ValueError:
        return None
    return bytes(name).decode()


def describe_call(audit_arch: int, number: int) -> str:
    """A blocked call as a message names it: its name in its own ABI, and the ABI when
    it is not the machine's (an i386 number is not an x86_64 name)."""
    known = AUDIT_ARCHES.get(audit_arch)
    if known is None:
        return f"number {number} of unknown ABI 0x{audit_arch:x}"
    arch, label = known
    if arch == seccomp.Arch.X86_64 and number & _X32_BIT:
        arch, label = seccomp.Arch.X32, "x32"
    name = syscall_name(number, arch) or f"number {number}"
    native = int(seccomp.system_arch()) & LOW_32_BITS == int(arch) & LOW_32_BITS
    return name if native else f"{name} ({label} ABI)"


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
