"""The physical floor on this machine: what the kernel operations a run needs cost alone.

    python -m bench.floor [--rounds 200]

Measured in a fresh interpreter (so the bench's own heap does not inflate a fork),
each operation `rounds` times; CPU is the rusage of this process and its reaped
children (a network namespace's teardown runs later in a kernel thread and is not
in it), wall is the mean time per operation:

- fork + exit + wait of this interpreter;
- a pid-namespace init: fork, unshare(CLONE_NEWPID), fork the init, its exit, both
  waits (so two forks);
- a network namespace: fork, unshare(CLONE_NEWNET), exit, wait;
- the exec of node (`node -e 0`) and of python3 (`python3 -I -S -c pass`);
- fork + exit + wait again, once this interpreter has imported the python3 runtime's
  warm modules: a worker's address space is the zygote's, and the kernel copies its
  page tables at the clone and unmaps them at the exit, which the daemon waits for.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from sandboxd.jail import libc

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
NODE = "/usr/bin/node"
PYTHON = "/usr/bin/python3"


class Cost(msgspec.Struct, frozen=True):
    name: str
    cpu_ms: float  # per operation
    wall_ms: float


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _child(body: Callable[[], None]) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def fork_exit() -> None:
    _child(lambda: None)


def pid_namespace_init() -> None:
    def parent() -> None:
        libc.unshare(libc.CLONE_NEWPID)
        _child(lambda: None)

    _child(parent)


def network_namespace() -> None:
    _child(lambda: libc.unshare(libc.CLONE_NEWNET))


@functools.cache
def _import_warm_modules() -> None:
    from sandboxd.runtimes import python3

    for module in python3.WARM_MODULES:
        __import__(module)


def warm_fork_exit() -> None:
    _import_warm_modules()  # once, in _measure's unmeasured first call
    fork_exit()


def _exec(argv: list[str]) -> Callable[[], None]:
    def run() -> None:
        pid = os.fork()
        if pid == 0:
            try:
                os.execve(argv[0], argv, {"PATH": "/usr/bin"})
            finally:
                os._exit(127)
        os.waitpid(pid, 0)

    return run


# Name, operation, the binary it needs (None: only the kernel), share of the rounds.
OPERATIONS: tuple[tuple[str, Callable[[], None], str | None, int], ...] = (
    ("fork+exit", fork_exit, None, 1),
    ("pid-namespace init (2 forks)", pid_namespace_init, None, 1),
    ("network namespace (fork+unshare)", network_namespace, None, 1),
    ("exec node -e 0", _exec([NODE, "-e", "0"]), NODE, 4),
    ("exec python3 -I -S -c pass", _exec([PYTHON, "-I", "-S", "-c", "pass"]), PYTHON, 4),
    # Last: its imports stay in this interpreter.
    ("fork+exit, warm modules imported", warm_fork_exit, None, 1),
)


def _measure(operation: Callable[[], None], rounds: int) -> tuple[float, float]:
    operation()  # warm the page cache and the allocator
    cpu = _cpu_seconds()
    wall = time.perf_counter()
    for _ in range(rounds):
        operation()
    wall = time.perf_counter() - wall
    cpu = _cpu_seconds() - cpu
    return cpu * 1000 / rounds, wall * 1000 / rounds


def costs(rounds: int) -> list[Cost]:
    found = []
    for name, operation, binary, share in OPERATIONS:
        if binary is not None and not os.path.exists(binary):
            continue
        cpu, wall = _measure(operation, max(1, rounds // share))
        found.append(Cost(name, cpu, wall))
    return found


def measure(rounds: int = 200) -> list[Cost]:
    """The floor, from a fresh interpreter; [] (and the reason on stderr) if it failed."""
    command = [sys.executable, "-m", "bench.floor", "--rounds", str(rounds), "--json"]
    done = subprocess.run(command, capture_output=True, cwd=_PROJECT_ROOT, check=False)
    if done.returncode != 0:
        print(f"bench: the floor was not measured: {done.stderr.decode()}", file=sys.stderr)
        return []
    return msgspec.json.decode(done.stdout, type=list[Cost])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    found = costs(max(4, args.rounds))
    if args.json:
        sys.stdout.write(msgspec.json.encode(found).decode() + "\n")
    else:
        for cost in found:
            print(f"{cost.name}: {cost.cpu_ms:.3f} ms CPU, {cost.wall_ms:.3f} ms wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
