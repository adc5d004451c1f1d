"""Where a generation's run cgroups live: a delegated systemd scope, or the host's v1 tree.

Measured in the QEMU guest (DESIGN.md): one transient scope costs about as much
as 22 fork+wait cycles, so a scope per worker would make systemd the throughput
ceiling. Instead each generation's zygote gets one transient scope under
sandboxd.slice with Delegate=yes (created once, off the request path), the
zygote moves to a `zygote` leaf inside it, and every worker gets a leaf cgroup
of its own next to it (cgroup.py) at a cost of a few cgroupfs writes. When the
generation retires, its leaves are removed, the scope empties and systemd
collects it (CollectMode=inactive-or-failed).
"""

from __future__ import annotations

import os
import re
import time
from typing import Protocol

from sandboxd.jail.cgroup import (
    CONTROLLERS_V1,
    V1_ROOT,
    Backend,
    LegacyBackend,
    UnifiedBackend,
    legacy_available,
    remove_tree,
)
from sandboxd.jail.liveness import daemon_alive

UNIFIED_ROOT = "/sys/fs/cgroup"
SLICE = "sandboxd.slice"
# The controllers each run's leaf needs, enabled for the scope's children.
CONTROLLERS = ("memory", "pids", "cpu")
# systemd moves the pid into the scope asynchronously, after StartTransientUnit returns.
MOVE_TIMEOUT = 10.0


class Placement(Protocol):
    name: str

    def attach(self, zygote_pid: int, generation: int) -> Backend:
        """The run cgroups of one generation whose zygote is `zygote_pid` (blocking)."""
        ...

    def close(self) -> None: ...


def systemd_available() -> bool:
    """systemd is PID 1 and the unified cgroup hierarchy is mounted at /sys/fs/cgroup."""
    return os.path.isdir("/run/systemd/system") and os.path.exists(
        f"{UNIFIED_ROOT}/cgroup.controllers"
    )


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as handle:
        for line in handle:
            if line.startswith("0::"):
                return line[3:].strip()
    raise RuntimeError(f"pid {pid} has no cgroup v2 membership")


class SystemdPlacement:
    name = "systemd"

    def __init__(self, slice_name: str = SLICE) -> None:
        self.slice = slice_name

    def attach(self, zygote_pid: int, generation: int) -> Backend:
        from pystemd.systemd1 import Manager

        unit = f"sandboxd-pool-{os.getpid()}-{generation}.scope"
        with Manager() as manager:
            manager.Manager.StartTransientUnit(
                unit.encode(),
                b"fail",
                {
                    b"Description": b"sandboxd workers (generation %d)" % generation,
                    b"Slice": self.slice.encode(),
                    b"Delegate": True,
                    b"CollectMode": b"inactive-or-failed",
                    # pystemd 0.11 has no signature for PIDs.
                    b"_custom": (b"PIDs", b"au", [zygote_pid]),
                },
            )
        deadline = time.monotonic() + MOVE_TIMEOUT
        while not _cgroup_of(zygote_pid).endswith("/" + unit):
            if time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not move the zygote into {unit}")
            time.sleep(0.005)
        scope = UNIFIED_ROOT + _cgroup_of(zygote_pid)
        # No process may sit in a cgroup whose children get controllers: the zygote
        # moves to a leaf of its own first.
        os.mkdir(f"{scope}/zygote")
        with open(f"{scope}/zygote/cgroup.procs", "w") as procs:
            procs.write(str(zygote_pid))
        with open(f"{scope}/cgroup.subtree_control", "w") as control:
            control.write(" ".join(f"+{c}" for c in CONTROLLERS))
        return ScopeBackend(scope)

    def close(self) -> None:
        pass  # every scope is collected by systemd once empty


class ScopeBackend(UnifiedBackend):
    """Run leaves inside one generation's scope; close() empties the scope."""

    name = "systemd"

    def close(self) -> None:
        try:
            os.rmdir(f"{self.parent}/zygote")  # the zygote has exited by now
        except OSError:
            pass  # already gone with the scope


class LegacyPlacement:
    """The host's v1 memory, pids, cpu and cpuacct hierarchies (no systemd PID 1)."""

    name = "cgroup1"

    def __init__(self) -> None:
        self.parent = f"sandboxd.{os.getpid()}"

    def attach(self, zygote_pid: int, generation: int) -> Backend:
        return LegacyBackend(f"{self.parent}/g{generation}")

    def close(self) -> None:
        for controller in CONTROLLERS_V1:
            try:
                os.rmdir(f"{V1_ROOT}/{controller}/{self.parent}")
            except OSError:
                pass  # not empty (logged by the generation) or already gone


def remove_stale_scopes(slice_name: str = SLICE) -> list[str]:
    """Kill and remove the generation scopes (`sandboxd-pool-<pid>-<n>.scope`) of dead
    daemons; systemd then collects the emptied units."""
    top = f"{UNIFIED_ROOT}/{slice_name}"
    removed: list[str] = []
    if not os.path.isdir(top):
        return removed
    for name in sorted(os.listdir(top)):
        found = re.fullmatch(r"sandboxd-pool-([0-9]+)-[0-9]+\.scope", name)
        if not found or daemon_alive(int(found[1])):
            continue
        path = f"{top}/{name}"
        if os.path.exists(f"{path}/cgroup.kill"):
            with open(f"{path}/cgroup.kill", "w") as kill:
                kill.write("1")
        if remove_tree(path):
            removed.append(path)
    return removed


def choose(mode: str) -> Placement | None:
    """The placement for [limits] cgroups; raises RuntimeError when "systemd" is impossible."""
    if mode == "off":
        return None
    if systemd_available():
        return SystemdPlacement()
    if mode == "systemd":
        raise RuntimeError(
            '[limits] cgroups = "systemd" needs systemd as PID 1 with the unified cgroup '
            'hierarchy; run under sandboxd.service, or set cgroups = "auto"'
        )
    if legacy_available():
        return LegacyPlacement()
    return None
