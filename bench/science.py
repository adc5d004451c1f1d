"""The data-science rows' extras: the baseline's environment, the zygote's RSS, and
the memory one run is charged (its cgroup's peak, as the daemon reports it)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.client import Connection, RequestTemplate
from bench.daemon import rss_kib
from bench.systems import BASELINE_ENV
from bench.workloads import Workload
from sandboxd import deps
from sandboxd.config import Config
from sandboxd.runtimes.datascience import ENVIRONMENT
from sandboxd.runtimes.template import COMM


def site_packages(state_dir: str | None) -> str | None:
    """The live jail environment the daemon under test serves from."""
    return deps.live_python_site_packages(state_dir or Config().server.state_dir)


def baseline_env(site: str | None, cache_dir: str) -> dict[str, str]:
    """`python3 -c` with the jail's packages (the synced environment `site` ahead of
    Debian's, as in the jail; Debian's alone when None) and the jail's thread and
    backend settings; a lasting matplotlib cache, so the baseline does not rebuild
    its font list per run."""
    path = {"PYTHONPATH": site} if site is not None else {}
    return {**BASELINE_ENV, **ENVIRONMENT, **path, "MPLCONFIGDIR": cache_dir}


def zygote_and_template(daemon_pid: int) -> tuple[int | None, int | None]:
    """The daemon's newest zygote and data-science template: children of the daemon in
    its own pid namespace (its workers have their own) running sandboxd.zygote, the
    template named template.COMM."""
    zygote = template = None
    try:
        pid_ns = os.readlink(f"/proc/{daemon_pid}/ns/pid")
    except OSError:
        return None, None
    for entry in sorted(Path("/proc").iterdir(), key=lambda e: e.name.zfill(12)):
        if not entry.name.isdigit():
            continue
        try:
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            command = (entry / "cmdline").read_bytes()
            same_ns = os.readlink(entry / "ns" / "pid") == pid_ns
            comm = (entry / "comm").read_text().strip()
        except (OSError, IndexError):
            continue
        if parent == str(daemon_pid) and same_ns and b"sandboxd.zygote" in command:
            if comm == COMM:
                template = int(entry.name)
            else:
                zygote = int(entry.name)
    return zygote, template


def template_rss_kib(daemon_pid: int) -> tuple[int | None, int | None]:
    """VmRSS of the plain zygote and of the data-science template (None: not found)."""
    zygote, template = zygote_and_template(daemon_pid)
    if zygote is None:
        return None, None
    return rss_kib(zygote), rss_kib(template) if template is not None else None


async def charged_bytes(socket: str, workload: Workload) -> int | None:
    """peak_memory_bytes of one run of the workload (what its cgroup was charged)."""
    async with await Connection.open(socket) as connection:
        answer, _ = await connection.request(RequestTemplate(workload.language, workload.code))
    return answer.peak_memory_bytes


def mib(value: int | None, unit: int) -> str:
    return "n/a" if value is None else f"{value * unit / (1 << 20):.1f} MiB"
