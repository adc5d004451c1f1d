"""The bench's results: the table, the ratios to the baselines, the targets, JSON."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from bench.cpu import ROLES
from bench.floor import Cost
from bench.stats import Cell
from bench.systems import SANDBOXD


class Ratio(msgspec.Struct, frozen=True):
    workload: str
    clients: int
    baseline: str
    latency: float  # baseline p50 / sandboxd p50: how many times faster per run
    throughput: float  # sandboxd runs/s / baseline runs/s


class Target(msgspec.Struct, frozen=True):
    name: str
    limit: str
    measured: str
    met: bool | None  # None: not measured in this run


class Report(msgspec.Struct, frozen=True):
    command: str
    system: str  # what the baselines are compared with (sandboxd, or the echo stand-in)
    loop_iterations: int
    loop_ms: float
    cells: list[Cell]
    ratios: list[Ratio]
    daemon_pid: int | None
    idle_rss_kib_after_warmup: int | None
    idle_rss_kib_after_bench: int | None
    daemon_exit: str | None  # how the daemon the bench started ended, when it did not end well
    targets: list[Target]
    floor: list[Cost] = []  # the kernel operations alone, measured in the same run


def ratios(cells: list[Cell], system: str = SANDBOXD) -> list[Ratio]:
    """Every baseline cell against `system`'s cell of the same workload and clients."""
    ours = {(c.workload, c.clients): c for c in cells if c.system == system}
    found = []
    for cell in cells:
        mine = ours.get((cell.workload, cell.clients))
        if cell.system == system or mine is None:
            continue
        if not (mine.p50_ms and cell.p50_ms and mine.runs_per_s and cell.runs_per_s):
            continue
        found.append(
            Ratio(
                workload=cell.workload,
                clients=cell.clients,
                baseline=cell.system,
                latency=cell.p50_ms / mine.p50_ms,
                throughput=mine.runs_per_s / cell.runs_per_s,
            )
        )
    return found


def _ours(cells: list[Cell], workload: str) -> list[Cell]:
    return [c for c in cells if c.system == SANDBOXD and c.workload == workload and c.runs]


def _at_most(
    name: str, limit: float, unit: str, value: Callable[[Cell], float | None], cells: list[Cell]
) -> Target:
    """Target on the best cell with one client (latency is quoted unloaded)."""
    single = [v for c in cells if c.clients == 1 and (v := value(c)) is not None]
    if not single:
        return Target(name, f"<= {limit:g} {unit}", "not measured", None)
    best = min(single)
    return Target(name, f"<= {limit:g} {unit}", f"{best:.2f} {unit}", best <= limit)


def _ratio_target(
    name: str, limit: float, found: list[Ratio], workload: str, baseline: str
) -> Target:
    """Best runs/s ratio of sandboxd to `baseline` on `workload` over the client counts."""
    values = [r.throughput for r in found if r.workload == workload and r.baseline == baseline]
    if not values:
        return Target(name, f">= {limit:g}x {baseline}", "not measured", None)
    best = max(values)
    return Target(name, f">= {limit:g}x {baseline}", f"{best:.2f}x", best >= limit)


def _loop_target(cells: list[Cell], loop_ms: float | None) -> Target:
    """The ~5 ms loop's own wall_ms in the jail against its time in the bench's interpreter."""
    name, limit = "~5 ms loop in the jail", "<= 1.1x plain"
    runs = [c.reported_p50_ms for c in _ours(cells, "python3 ~5 ms loop") if c.clients == 1]
    measured = [ms for ms in runs if ms is not None]
    if not measured or not loop_ms:
        return Target(name, limit, "not measured", None)
    share = min(measured) / loop_ms
    return Target(name, limit, f"{share:.2f}x ({min(measured):.2f} ms)", share <= 1.1)


def _cpu_target(cells: list[Cell]) -> Target:
    totals = [c.cpu.total_ms for c in _ours(cells, "python3 hello") if c.cpu is not None]
    if not totals:
        return Target("python3 hello CPU per run", "<= 4 ms", "not measured", None)
    best = min(totals)
    return Target("python3 hello CPU per run", "<= 4 ms", f"{best:.2f} ms", best <= 4)


# The data-science workloads' p50 targets (DESIGN.md), judged when they ran.
SCIENCE_TARGETS_MS = {
    "python3 numpy": 5.0,
    "python3 pandas DataFrame": 15.0,
    "python3 plot as PNG": 60.0,
}


def targets(
    cells: list[Cell],
    rss_kib: int | None,
    found: list[Ratio] | None = None,
    loop_ms: float | None = None,
) -> list[Target]:
    """The performance targets of DESIGN.md, checked against this run (latency on the
    best one-client cell: run with --think-ms for the paced figures)."""
    found = found or []
    hello = _ours(cells, "python3 hello")
    node = _ours(cells, "nodejs hello")
    result = [
        _at_most("python3 hello p50, 1 client", 1.5, "ms", lambda c: c.p50_ms, hello),
        _at_most("python3 hello p99, 1 client", 5, "ms", lambda c: c.p99_ms, hello),
        _at_most("nodejs hello p50, 1 client", 5, "ms", lambda c: c.p50_ms, node),
    ]
    four = [c.runs_per_s for c in hello if c.clients == 4]
    if four:
        best = max(four)
        result.append(
            Target("python3 hello, 4 clients", ">= 400 runs/s", f"{best:.0f} runs/s", best >= 400)
        )
    else:
        result.append(Target("python3 hello, 4 clients", ">= 400 runs/s", "not measured", None))
    result += [
        _ratio_target("python3 hello throughput", 3, found, "python3 hello", "python3 -c"),
        _cpu_target(cells),
        _loop_target(cells, loop_ms),
        _ratio_target("nodejs hello throughput", 1.5, found, "nodejs hello", "node -e"),
    ]
    for workload, limit in SCIENCE_TARGETS_MS.items():
        if ours := _ours(cells, workload):
            name = f"{workload} p50, 1 client"
            result.append(_at_most(name, limit, "ms", lambda c: c.p50_ms, ours))
    if rss_kib is None:
        result.append(Target("idle daemon RSS", "<= 60 MB", "not measured", None))
    else:
        mib = rss_kib / 1024
        result.append(Target("idle daemon RSS", "<= 60 MB", f"{mib:.1f} MB", mib <= 60))
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]], left: int) -> list[str]:
    """Columns padded to width; the first `left` columns flush left, the rest right.

    A row shorter than the header spans: its last value runs on, unpadded, and
    does not widen any column.
    """
    full = [header, *(r for r in rows if len(r) == len(header))]
    widths = [max(len(r[i]) for r in full) for i in range(len(header))]

    def line(row: list[str]) -> str:
        if len(row) < len(header):
            return "  ".join([*(v.ljust(widths[i]) for i, v in enumerate(row[:-1])), row[-1]])
        cells = [
            value.ljust(widths[i]) if i < left else value.rjust(widths[i])
            for i, value in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


def cell_rows(cells: list[Cell]) -> list[str]:
    header = ["system", "workload", "clients", "runs", "p50 ms", "p99 ms", "runs/s", "errors"]
    header.append("run p50 ms")
    rows = []
    for c in cells:
        if c.unavailable is not None:
            rows.append([c.system, c.workload, str(c.clients).rjust(len("clients")), c.unavailable])
            continue
        rows.append([
            c.system, c.workload, str(c.clients), str(c.runs), _ms(c.p50_ms), _ms(c.p99_ms),
            f"{c.runs_per_s:.1f}", str(c.errors), _ms(c.reported_p50_ms),
        ])  # fmt: skip
    return _table(header, rows, left=2)


def cpu_rows(cells: list[Cell]) -> list[str]:
    """CPU per run by role (ms) for every cell that measured it; the roles add up to total."""
    header = ["workload", "clients", *ROLES, "total", "kthreads*"]
    rows = [
        [
            c.workload, str(c.clients), *(f"{c.cpu.roles[role]:.2f}" for role in ROLES),
            f"{c.cpu.total_ms:.2f}", f"{c.cpu.kernel_threads_ms:.2f}",
        ]
        for c in cells
        if c.cpu is not None
    ]  # fmt: skip
    return _table(header, rows, left=1)


def floor_rows(found: list[Cost]) -> list[str]:
    rows = [[c.name, f"{c.cpu_ms:.3f}", f"{c.wall_ms:.3f}"] for c in found]
    return _table(["operation", "CPU ms", "wall ms"], rows, left=1)


def ratio_rows(found: list[Ratio]) -> list[str]:
    header = ["workload", "baseline", "clients", "p50 ratio", "runs/s ratio"]
    rows = [
        [r.workload, r.baseline, str(r.clients), f"{r.latency:.1f}x", f"{r.throughput:.1f}x"]
        for r in found
    ]
    return _table(header, rows, left=2)


def error_rows(cells: list[Cell]) -> list[str]:
    lines = []
    for c in cells:
        for description, count in c.error_kinds.items():
            lines.append(
                f"{c.system} / {c.workload} / {c.clients} clients: {count} x {description}"
            )
    return lines


def render(report: Report) -> str:
    out = [
        f"command: {report.command}",
        f"~5 ms loop: {report.loop_iterations} iterations, {report.loop_ms:.2f} ms in this "
        "interpreter",
        "",
        *cell_rows(report.cells),
        "",
        f"ratios: baseline p50 / {report.system} p50, and {report.system} runs/s / baseline runs/s",
        *(ratio_rows(report.ratios) if report.ratios else ["(no baseline and sandboxd pair)"]),
        "",
    ]
    split = cpu_rows(report.cells)
    if len(split) > 1:
        out += [
            "CPU per run by role, ms (the daemon's cpuacct cgroup; roles add up to total;",
            "* kernel threads system-wide, not in total: deferred namespace teardown and",
            "  whatever else this machine's kernel did meanwhile):",
            *split,
            "",
        ]
    if report.floor:
        out += ["floor (the kernel operations alone, this machine, this run):"]
        out += [*floor_rows(report.floor), ""]
    errors = error_rows(report.cells)
    out += ["errors (every non-ok run):", *(errors or ["none"]), ""]
    rss = [
        ("after warm-up", report.idle_rss_kib_after_warmup),
        ("after the bench", report.idle_rss_kib_after_bench),
    ]
    for when, kib in rss:
        shown = "not measured" if kib is None else f"{kib / 1024:.1f} MB"
        out.append(f"daemon (pid {report.daemon_pid}) idle RSS {when}: {shown}")
    if report.daemon_exit is not None:
        out.append(f"daemon stop FAILED: {report.daemon_exit}")
    if not report.targets:
        return "\n".join(out)
    out += ["", "targets (DESIGN.md):"]
    status = {True: "met", False: "MISSED", None: "-"}
    out += _table(
        ["target", "limit", "measured", ""],
        [[t.name, t.limit, t.measured, status[t.met]] for t in report.targets],
        left=4,
    )
    return "\n".join(out)


def to_json(report: Report) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report), indent=2)
