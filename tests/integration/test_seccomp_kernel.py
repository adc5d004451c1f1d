"""The kernel's verdict on the compiled policies, on this host as it is.

Each test forks a child that sets PR_SET_NO_NEW_PRIVS, loads a policy compiled
in the parent (as the zygote does), then tries one thing. The parent reads the
outcome from waitpid (killed by SIGSYS, or the exit code) and from a pipe. No
chroot or namespaces are needed: only the filter is under test, and it needs
no privilege once NO_NEW_PRIVS is set, so these tests do not require root.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import signal
import struct
import tempfile
import termios
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import seccomp as libseccomp

from sandboxd.jail import libc
from sandboxd.jail.seccomp import PR_GET_SECCOMP, compile_policy, load

KILLED_BY_SIGSYS = -signal.SIGSYS
X32_SYSCALL_BIT = 0x40000000
NODE = Path("/usr/bin/node")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def nr(name: str) -> int:
    return int(libseccomp.resolve_syscall(libseccomp.Arch.NATIVE, name))


def raw_syscall(number: int, *args: int) -> int:
    """A system call by number; returns the errno on failure, 0 on success."""
    result = _libc.syscall(ctypes.c_long(number), *(ctypes.c_ulong(a) for a in args))
    return ctypes.get_errno() if result == -1 else 0


def run_filtered(language: str | None, attempt: Callable[[], object]) -> tuple[int, str]:
    """Run `attempt` in a forked child under the language's filter (None: no filter).

    Returns the child's exit code as os.waitstatus_to_exitcode gives it
    (negative for a signal) and what the child reported: repr of the result,
    or the exception it raised.
    """
    program = compile_policy(language) if language is not None else None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.close(read_end)
            libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
            if program is not None:
                load(program)
            report, code = repr(attempt()), 0
        except BaseException as exc:  # reported to the parent, which fails the test
            report, code = f"{type(exc).__name__}: {exc}", 1
        finally:
            try:
                os.write(write_end, report.encode())
            finally:
                os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        report_bytes = reader.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), report_bytes.decode(errors="replace")


def assert_killed(language: str, attempt: Callable[[], object]) -> None:
    code, report = run_filtered(language, attempt)
    assert code == KILLED_BY_SIGSYS, f"exit {code}, child said {report!r}"


def assert_returns(language: str, attempt: Callable[[], object], expected: object) -> None:
    code, report = run_filtered(language, attempt)
    assert (code, report) == (0, repr(expected))


# --- load() itself --------------------------------------------------------------------


def in_child(check: Callable[[], bool]) -> int:
    """Run `check` in a forked child without NO_NEW_PRIVS; its exit code (0: it held)."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if check() else 1)
        finally:
            os._exit(70)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_load_refuses_to_run_without_no_new_privs() -> None:
    program = compile_policy("python3")

    def refused() -> bool:
        try:
            load(program)
        except PermissionError:
            return libc.prctl(PR_GET_SECCOMP) == 0
        return False

    assert in_child(refused) == 0


def test_load_reports_the_kernel_refusing_a_program_as_oserror() -> None:
    bad_opcode = bytes([0xFF, 0xFF, 0, 0, 0, 0, 0, 0])

    def refused() -> bool:
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        try:
            load(bad_opcode)
        except OSError as error:
            return error.errno == errno.EINVAL and libc.prctl(PR_GET_SECCOMP) == 0
        return False

    assert in_child(refused) == 0


# --- refused: the kernel kills the process -------------------------------------------

REFUSED_CALLS: dict[str, Callable[[], object]] = {
    "io_uring_setup": lambda: raw_syscall(nr("io_uring_setup"), 1, 0),
    "ptrace_traceme": lambda: raw_syscall(nr("ptrace"), 0, 0, 0, 0),
    "bpf": lambda: raw_syscall(nr("bpf"), 0, 0, 0),
    "unshare_user_namespace": lambda: raw_syscall(nr("unshare"), libc.CLONE_NEWUSER),
    "mount_tmpfs": lambda: raw_syscall(nr("mount"), 0, 0, 0, 0, 0),
    "keyctl": lambda: raw_syscall(nr("keyctl"), 0, 0, 0, 0, 0),
    "setuid": lambda: raw_syscall(nr("setuid"), os.getuid()),
    "clone_new_mount_namespace": lambda: raw_syscall(
        nr("clone"), libc.CLONE_NEWNS | signal.SIGCHLD, 0, 0, 0, 0
    ),
    "x32_getpid": lambda: raw_syscall(nr("getpid") | X32_SYSCALL_BIT),
}


@pytest.mark.parametrize("attempt", REFUSED_CALLS.values(), ids=REFUSED_CALLS.keys())
def test_python_worker_is_killed_by_sigsys(attempt: Callable[[], object]) -> None:
    assert_killed("python3", attempt)


# A raw clone would return in two processes, so it has no unfiltered control.
CONTROLLED = {name: call for name, call in REFUSED_CALLS.items() if not name.startswith("clone")}


@pytest.mark.parametrize("attempt", CONTROLLED.values(), ids=CONTROLLED.keys())
def test_without_the_filter_the_same_calls_return(attempt: Callable[[], object]) -> None:
    """Control: the kills above come from the filter, not from the calls themselves."""
    code, report = run_filtered(None, attempt)
    assert code == 0, report


# --- refused softly: an errno ------------------------------------------------------


def tiocsti(terminal: int, high_bits: int = 0) -> int:
    """Push one byte into a terminal's input, with `high_bits` above the 32-bit command."""
    byte = ctypes.c_char(b"x")
    return raw_syscall(nr("ioctl"), terminal, high_bits | termios.TIOCSTI, ctypes.addressof(byte))


AF_NETLINK, SOCK_RAW, PR_SET_DUMPABLE = 16, 3, 4

# name: (attempt on a pty opened before the filter, the errno the filter answers)
SOFT_REFUSALS: dict[str, tuple[Callable[[int], int], int]] = {
    "tiocsti": (tiocsti, errno.EPERM),
    # the kernel truncates the command to 32 bits, so the filter must compare those
    "tiocsti_with_high_bits_set": (lambda pty: tiocsti(pty, 1 << 32), errno.EPERM),
    "clone3": (lambda _: raw_syscall(nr("clone3"), 0, 0), errno.ENOSYS),
    "netlink_socket": (
        lambda _: raw_syscall(nr("socket"), AF_NETLINK, SOCK_RAW, 0), errno.EAFNOSUPPORT
    ),
    "prctl_set_dumpable": (lambda _: raw_syscall(nr("prctl"), PR_SET_DUMPABLE, 1), errno.EPERM),
}


@pytest.fixture
def pty() -> Iterator[int]:
    """The slave side of a pseudo-terminal, opened before any filter."""
    master, slave = os.openpty()
    yield slave
    os.close(master)
    os.close(slave)


@pytest.mark.parametrize("attempt, error", SOFT_REFUSALS.values(), ids=SOFT_REFUSALS.keys())
def test_python_worker_gets_an_errno(
    pty: int, attempt: Callable[[int], int], error: int
) -> None:
    assert_returns("python3", lambda: attempt(pty), error)


@pytest.mark.parametrize("attempt, error", SOFT_REFUSALS.values(), ids=SOFT_REFUSALS.keys())
def test_without_the_filter_the_errno_differs(
    pty: int, attempt: Callable[[int], int], error: int
) -> None:
    code, report = run_filtered(None, lambda: attempt(pty))
    assert code == 0, report
    assert report != repr(error)


def test_terminal_queries_work(pty: int) -> None:
    def query() -> tuple[bool, int, bool]:
        window = fcntl.ioctl(pty, termios.TIOCGWINSZ, b"\0" * 8)
        return os.isatty(pty), len(window), bool(termios.tcgetattr(pty))

    assert_returns("python3", query, (True, 8, True))


# --- allowed: the runtime works -------------------------------------------------------


def test_threads_run_and_join() -> None:
    def threads() -> list[int]:
        results: list[int] = []
        workers = [threading.Thread(target=results.append, args=(n,)) for n in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sorted(results)

    assert_returns("python3", threads, [0, 1, 2, 3])


def test_fork_works_in_a_filtered_child() -> None:
    def fork_and_wait() -> int:
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert_returns("python3", fork_and_wait, 7)


def test_stdlib_and_tmp_files_work() -> None:
    def everyday() -> tuple[str, str, str, int, str]:
        import datetime
        import json
        import re
        import sqlite3
        import statistics

        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch, "a.json")
            path.write_text(json.dumps({"x": [1, 2, 3]}))
            path.rename(Path(scratch, "b.json"))
            loaded = json.loads(Path(scratch, "b.json").read_text())
        database = sqlite3.connect(":memory:")
        total = database.execute("select 40 + 2").fetchone()[0]
        database.close()
        return (
            re.sub(r"\d", "#", "a1b2"),
            hashlib.sha256(b"sandboxd").hexdigest()[:8],
            datetime.date(2024, 2, 29).isoformat(),
            total + int(statistics.mean(loaded["x"])) - 2,
            struct.pack("<H", 1).hex(),
        )

    expected = ("a#b#", hashlib.sha256(b"sandboxd").hexdigest()[:8], "2024-02-29", 42, "0100")
    assert_returns("python3", everyday, expected)


def test_subprocess_of_the_interpreter_works() -> None:
    def run_python() -> tuple[int, bytes]:
        import subprocess

        done = subprocess.run(
            ["/usr/bin/python3", "-I", "-S", "-c", "print(6 * 7)"],
            capture_output=True, env={}, check=False,
        )
        return done.returncode, done.stdout

    assert_returns("python3", run_python, (0, b"42\n"))


def test_loopback_tcp_works() -> None:
    def echo() -> bytes:
        import socket

        with (
            socket.create_server(("127.0.0.1", 0)) as server,
            socket.create_connection(server.getsockname()) as client,
        ):
            accepted, _ = server.accept()
            with accepted:
                client.sendall(b"ping")
                return accepted.recv(4)

    assert_returns("python3", echo, b"ping")


# --- node: the filter is loaded, then node is executed ---------------------------------


def run_node_filtered(script: str) -> tuple[int, str, str]:
    """execve node with a script after loading the nodejs policy; (exit code, stdout, stderr)."""
    assert NODE.exists(), f"{NODE} is needed for the nodejs policy tests"
    program = compile_policy("nodejs")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
                load(program)
                os.execve(NODE, [NODE.name, "-e", script], {"PATH": "/usr/bin:/bin"})
            finally:
                os._exit(70)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


@pytest.mark.nodejs
def test_node_prints_under_its_filter() -> None:
    assert run_node_filtered("console.log(1 + 1)") == (0, "2\n", "")


NODE_EVERYDAY = """
const fs = require('fs');
const crypto = require('crypto');
const { Worker } = require('worker_threads');
const parts = [];
parts.push(fs.readFileSync('/etc/hostname', 'utf8').length > 0);
parts.push(crypto.randomBytes(8).length);
parts.push(Buffer.from('sandboxd').toString('base64'));
new Promise((resolve) => setTimeout(resolve, 5)).then(() => {
  const worker = new Worker(
    "require('worker_threads').parentPort.postMessage(6 * 7)", { eval: true });
  worker.on('message', (n) => { parts.push(n); console.log(parts.join(' ')); });
});
"""


@pytest.mark.nodejs
def test_node_timers_promises_fs_crypto_buffer_and_workers_work() -> None:
    assert run_node_filtered(NODE_EVERYDAY) == (0, "true 8 c2FuZGJveGQ= 42\n", "")
