"""What a worker's mount namespace costs, alone: the steps of jail/rootfs.py timed
in forked children of a process that holds every root of the default config's
runtimes (daemon.build_spec), as the zygote does, for a worker of the python3
root (run as root; everything happens in a private mount namespace).

    python -m bench.mountns [--rounds 300]

Three ways, interleaved in blocks: "fork" (clone and exit, nothing else);
"copy+pivot" (clone with CLONE_NEWNS, copying the whole namespace, then a private
/tmp, pivot_root into the root and detach the old root: the earlier worker);
"prebuilt" (clone, setns into the root's prebuilt namespace, unshare a copy, a
private /tmp: rootfs.enter). Per child: the parent's CPU in clone() (where a
CLONE_NEWNS copy is made: the zygote's, in the daemon), the child's CPU until set
up (its own getrusage), the CPU of its exit (wait4's total less that: the
namespace's teardown), and the wall time from the clone to set up and from set up
to reaped.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

from sandboxd import config, daemon
from sandboxd.jail import libc, rootfs

_MODES = ("fork", "copy+pivot", "prebuilt")


def _setup(mode: str, root: str, namespace: int) -> None:
    if mode == "copy+pivot":
        libc.mount("sandboxd-tmp", root + "/tmp", "tmpfs", libc.MS_NOSUID, "size=64m")
        os.chdir(root)
        libc.pivot_root(".", ".")
        libc.umount2(".", libc.MNT_DETACH)
        os.chdir("/tmp")
    elif mode == "prebuilt":
        rootfs.enter(namespace, [namespace], 64, 0)


def _once(mode: str, root: str, namespace: int) -> tuple[float, ...]:
    """(clone CPU, setup CPU, exit CPU, setup wall, exit wall) of one child, in ms."""
    read_end, write_end = os.pipe()
    flags = libc.CLONE_NEWNS if mode == "copy+pivot" else 0
    start = time.perf_counter()
    before = time.thread_time()
    pid, _ = libc.clone(flags)
    if pid == 0:
        try:
            _setup(mode, root, namespace)
            own = resource.getrusage(resource.RUSAGE_SELF)
            os.write(write_end, f"{own.ru_utime + own.ru_stime} {time.perf_counter()}".encode())
        finally:
            os._exit(0)
    cloning = time.thread_time() - before
    os.close(write_end)
    cpu, ready = (float(word) for word in os.read(read_end, 64).split())
    os.close(read_end)
    _, status, usage = os.wait4(pid, 0)
    reaped = time.perf_counter()
    if status != 0:
        raise RuntimeError(f"{mode}: the child failed ({status})")
    total = usage.ru_utime + usage.ru_stime
    return tuple(
        ms * 1000 for ms in (cloning, cpu, total - cpu, ready - start, reaped - ready)
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mountns", description=__doc__)
    parser.add_argument("--rounds", type=int, default=300, help="children per way")
    args = parser.parse_args()
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE)
    base = tempfile.mkdtemp(prefix="sandboxd-bench-mountns-")
    libc.mount("bench", base, "tmpfs", 0, "size=1m")
    spec, _ = daemon.build_spec(config.load_config(None, {}), cgroups_in_force=False)
    roots = {}
    for name, runtime in spec.runtimes.items():
        if spec.root_name(name) == name:
            roots[name] = os.path.join(base, name)
            rootfs.build(roots[name], runtime.entries, {})
    namespace = rootfs.prebuild(roots["python3"])
    with open("/proc/self/mountinfo") as table:
        print(f"roots {sorted(roots)}; mounts here (the zygote's stand-in): {len(list(table))}")
    samples: dict[str, list[tuple[float, ...]]] = {m: [] for m in _MODES}
    block = max(1, args.rounds // 3)
    while any(len(done) < args.rounds for done in samples.values()):
        for mode in _MODES:
            for _ in range(min(block, args.rounds - len(samples[mode]))):
                samples[mode].append(_once(mode, roots["python3"], namespace))
    columns = ("clone CPU", "setup CPU", "exit CPU", "setup wall", "exit wall")
    print(f"{'way':<12} " + " ".join(f"{name:>10}" for name in columns))
    print(f"{'(ms, p50)':<12}")
    for mode, rows in samples.items():
        cells = [statistics.median(column) for column in zip(*rows, strict=True)]
        print(f"{mode:<12} " + " ".join(f"{cell:>10.3f}" for cell in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
