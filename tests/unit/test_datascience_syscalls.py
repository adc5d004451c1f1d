"""The system calls numpy, pandas and matplotlib make, as measured, against the python3
seccomp policy: none of them may fall to the default action (a kill).

Catalogue: `strace -f` of /usr/bin/python3 running a broad data-science script (BLAS
with OPENBLAS_NUM_THREADS=1 and =4, numpy.linalg in four threads, pandas to_csv,
read_csv and groupby, a matplotlib figure with text and mathtext saved as PNG to a
buffer and a file, a first font-cache build, sched_getaffinity and cpu_count) with
numpy 2, pandas 2 and matplotlib 3 from PyPI, union of both thread settings; then
the same with Debian 12's numpy 1.24, pandas 1.5.3 and matplotlib 3.6.3 (and Pillow's
Image.open of the PNG), which added getcwd and getpid. The same kind of run goes
jailed, 50 at a time, on both in tests/integration/test_datascience.py.
"""

from __future__ import annotations

import pytest

from sandboxd.jail import seccomp

MEASURED = (
    "access", "arch_prctl", "brk", "clone3", "close", "close_range", "dup2",
    "epoll_create1", "execve", "exit", "exit_group", "fadvise64", "fcntl", "fstat",
    "fstatfs", "futex", "getdents64", "getegid", "geteuid", "getgid", "getrandom",
    "gettid", "getuid", "ioctl", "lseek", "madvise", "mbind", "mkdir", "mmap",
    "mprotect", "munmap", "newfstatat", "openat", "pipe2", "pread64", "prlimit64",
    "read", "readlink", "rseq", "rt_sigaction", "rt_sigprocmask", "sched_getaffinity",
    "set_robust_list", "set_tid_address", "sysinfo", "uname", "unlink", "vfork",
    "wait4", "write",
    # glibc's fallback when clone3 gets ENOSYS: the threads of BLAS and of the code
    "clone",
    # statx: newer glibc and Python stat through it; OpenBLAS reads the CPU count
    "statx", "sched_yield",
    # also seen with Debian's builds (the interpreter's start-up, BLAS thread start)
    "getcwd", "getpid",
)  # fmt: skip


@pytest.mark.parametrize("name", MEASURED)
def test_a_data_science_system_call_is_never_a_kill(name: str) -> None:
    policy = seccomp.POLICIES["python3"]
    ruled = {rule.syscall for rule in policy.arg_rules}
    assert name in policy.allow or name in policy.errno or name in ruled, name
