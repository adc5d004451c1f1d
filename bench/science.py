"""The data-science rows' extras: the baseline's environment, the zygote's RSS, and
the memory one run is charged (its cgroup's peak, as the daemon reports it)."""

from __future__ import annotations

from pathlib import Path

from bench.client import Connection, RequestTemplate
from bench.daemon import rss_kib
from bench.systems import BASELINE_ENV
from bench.workloads import Workload
from sandboxd import deps
from sandboxd.config import Config
from sandboxd.runtimes.datascience import ENVIRONMENT


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


def _children(parent_pid: int) -> list[int]:
    """The pids whose parent is parent_pid and whose command runs sandboxd.zygote (the
    zygote, the data-science template and the keepers are forks of it: the same one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if parent == str(parent_pid) and b"sandboxd.zygote" in command:
            found.append(int(entry.name))
    return found


def template_rss_kib(daemon_pid: int) -> tuple[int | None, int | None]:
    """VmRSS of the plain zygote and of the data-science template (None: not found).
    The zygote's children are the template and the plain pools' keepers; the template
    is the one whose children (its keepers) have children (their workers)."""
    zygotes = _children(daemon_pid)
    if not zygotes:
        return None, None
    zygote = zygotes[0]
    templates = [pid for pid in _children(zygote) if any(map(_children, _children(pid)))]
    return rss_kib(zygote), rss_kib(templates[0]) if templates else None


async def charged_bytes(socket: str, workload: Workload) -> int | None:
    """peak_memory_bytes of one run of the workload (what its cgroup was charged)."""
    async with await Connection.open(socket) as connection:
        answer, _ = await connection.request(RequestTemplate(workload.language, workload.code))
    return answer.peak_memory_bytes


def mib(value: int | None, unit: int) -> str:
    return "n/a" if value is None else f"{value * unit / (1 << 20):.1f} MiB"
