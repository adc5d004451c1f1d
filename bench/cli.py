"""`python -m bench`: load sandboxd and the spawn-per-run baselines, print the table.

Order of a run: calibrate the ~5 ms loop; measure the floor (bench/floor.py);
start a private daemon in a cpuacct cgroup of its own (or use --socket); warm
every workload up and read the daemon's idle RSS; run every (workload, clients)
cell against the daemon, reading where its CPU went around each (bench/cpu.py);
read the idle RSS again; stop the daemon; run the same cells against the
baselines; print. Progress goes to
stderr, the report to stdout. Exit status 1 when any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import trio

from bench import cpu, floor, science
from bench import daemon as daemons
from bench.load import Budget, run_cell
from bench.report import Report, ratios, render, targets, to_json
from bench.soak import SoakPlan, soak
from bench.stats import Cell, summarize, unavailable
from bench.systems import (
    BASELINE_ENV,
    BASELINES,
    SANDBOXD,
    Baseline,
    baseline_run,
    probe,
    sandboxd_clients,
)
from bench.workloads import READY, Workload, all_workloads, calibrate_loop, science_workloads

# The system name of the --echo stand-in's rows.
ECHO = "echo (runs nothing)"
# Seconds the daemon gets after a burst to refill its pools before RSS is read.
SETTLE_SECONDS = 1.0
# Seconds after a cell before its CPU is read: the pools refill (their workers' cost
# before the job belongs to the cell that used the workers).
CPU_SETTLE_SECONDS = 0.5
# A --runs cell without --duration still stops after this long.
RUNS_TIME_CAP = 120.0


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _counts(text: str) -> list[int]:
    return [int(part) for part in _names(text)]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="daemon socket (default with --start-daemon: a temp one)")
    parser.add_argument(
        "--start-daemon",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start `sandboxd serve --http none` on a temporary socket and runtime dir "
        "(default); --no-start-daemon uses the daemon already on --socket",
    )
    parser.add_argument(
        "--echo", action="store_true", help="start a stand-in that runs nothing (client cost)"
    )
    parser.add_argument("--daemon-config", type=Path, help="base TOML config for the daemon")
    parser.add_argument(
        "--daemon-pid",
        type=int,
        help="pid whose RSS to report (default: the socket's listener, from SO_PEERCRED; "
        "under socket activation that is systemd, so pass the service's MainPID)",
    )
    parser.add_argument("--state-dir", help="passed to `sandboxd serve --state-dir`")
    parser.add_argument("--start-timeout", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument(
        "--duration", type=float, help="seconds per cell (default 2; with --runs: a time cap)"
    )
    parser.add_argument("--runs", type=int, help="runs per cell (over all its clients)")
    parser.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="pause of each client between runs (default 0: closed loop, i.e. throughput)",
    )
    parser.add_argument("--clients", type=_counts, default=[1, 4, 16], help="e.g. 1,4,16")
    parser.add_argument(
        "--connections",
        type=int,
        default=0,
        help="connections the clients of a cell share, requests in flight on each "
        "(default 0: one per client)",
    )
    parser.add_argument(
        "--workloads",
        type=_names,
        help="keys: py-hello,py-loop5ms,py-dify,node-hello,node-dify (default all of those); "
        "py-numpy,py-pandas,py-plot need numpy, pandas and matplotlib: Debian's packages "
        "(apt) or --state-dir of a synced environment, which shadows them",
    )
    parser.add_argument(
        "--baselines", action=argparse.BooleanOptionalAction, default=True,
        help="also run the spawn-per-run baselines (default on)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured runs per workload")
    parser.add_argument("--run-timeout", type=float, default=30.0, help="client-side, seconds")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help="instead of the table: soak a private daemon at 2x capacity with hostile "
        "clients and kill -9 of workers and zygotes (bench/soak.py); exit 1 unless "
        "0 wrong, 0 silent, 0 lost",
    )
    parser.add_argument(
        "--soak-kill-every", type=float, default=2.0, help="seconds between worker kills"
    )
    parser.add_argument(
        "--soak-zygote-every", type=float, default=30.0, help="seconds between zygote kills"
    )
    parser.add_argument(
        "--soak-sample-every", type=float, default=30.0, help="seconds between RSS samples"
    )
    parser.add_argument(
        "--soak-uid-min", type=int, default=4_500_000, help="first of the daemon's 2000 uids"
    )
    args = parser.parse_args(argv)
    if not args.start_daemon and not args.socket:
        parser.error("--no-start-daemon needs --socket")
    if not args.clients or min(args.clients) < 1:
        parser.error("--clients needs positive counts")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be positive")
    return args


class Progress:
    def __init__(self) -> None:
        self._start = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self._start:6.1f}s] {text}", file=sys.stderr, flush=True)

    def cell(self, cell: Cell) -> None:
        if cell.unavailable is not None:
            self.say(f"{cell.system} | {cell.workload} | {cell.clients}: {cell.unavailable}")
            return
        p50 = "-" if cell.p50_ms is None else f"{cell.p50_ms:.2f} ms"
        self.say(
            f"{cell.system} | {cell.workload} | {cell.clients} clients: {cell.runs} runs, "
            f"p50 {p50}, {cell.runs_per_s:.1f}/s, {cell.errors} errors"
        )


def _budget(args: argparse.Namespace) -> Budget:
    think = args.think_ms / 1000
    if args.runs is None:
        return Budget(
            seconds=args.duration or 2.0, runs=10**9, run_timeout=args.run_timeout, think=think
        )
    return Budget(
        seconds=args.duration or RUNS_TIME_CAP,
        runs=args.runs,
        run_timeout=args.run_timeout,
        think=think,
    )


def _availability(answer_code: str | None, workload: Workload) -> str | None:
    if answer_code == "unsupported_language":
        return f"n/a ({'node' if workload.language == 'nodejs' else 'python3'} pool not available)"
    return None


class DaemonBench:
    """The daemon half of a run: warm-up, RSS and the sandboxd cells."""

    def __init__(
        self,
        args: argparse.Namespace,
        workloads: list[Workload],
        say: Progress,
        tree: cpu.TreeCgroup | None = None,
    ):
        self.system = ECHO if args.echo else SANDBOXD
        self.tree = tree  # the daemon's cpuacct cgroup, when the bench started it
        self.args = args
        self.workloads = workloads
        self.progress = say
        self.cells: list[Cell] = []
        self.pid: int | None = None
        self.rss_warm: int | None = None
        self.rss_after: int | None = None

    async def run(self, daemon: daemons.Daemon) -> None:
        self.pid = self.args.daemon_pid or await daemons.daemon_pid(daemon.socket)
        self.progress.say(f"daemon answers on {daemon.socket} (pid {self.pid})")
        if self.pid == 1:
            self.progress.say(
                "the socket's listener is pid 1 (socket activation): pass --daemon-pid"
            )
        missing: dict[str, str] = {}
        for workload in self.workloads:
            for _ in range(max(1, self.args.warmup)):
                answer = await probe(daemon.socket, workload)
                reason = _availability(answer.error.code if answer.error else None, workload)
                if reason is not None:
                    missing[workload.key] = reason
                    break
        await trio.sleep(SETTLE_SECONDS)
        self.rss_warm = daemons.rss_kib(self.pid) if self.pid != 1 else None
        await self._memory(daemon, missing)
        for workload in self.workloads:
            for clients in self.args.clients:
                if workload.key in missing:
                    cell = unavailable(self.system, workload.title, clients, missing[workload.key])
                else:
                    cell = await self._cell(daemon, workload, clients)
                self.cells.append(cell)
                self.progress.cell(cell)
        await trio.sleep(SETTLE_SECONDS)
        self.rss_after = daemons.rss_kib(self.pid) if self.pid != 1 else None

    async def _memory(self, daemon: daemons.Daemon, missing: dict[str, str]) -> None:
        """The zygote's RSS (what the warm modules cost once) and each workload's charge."""
        if self.args.echo or self.pid is None:
            return
        plain, warm = science.template_rss_kib(self.pid)
        self.progress.say(
            f"RSS: zygote {science.mib(plain, 1024)}, "
            f"data-science template {science.mib(warm, 1024)}"
        )
        for workload in (w for w in self.workloads if w.key not in missing):
            charged = await science.charged_bytes(daemon.socket, workload)
            self.progress.say(f"{workload.title}: charged {science.mib(charged, 1)} per run")

    async def _cell(self, daemon: daemons.Daemon, workload: Workload, clients: int) -> Cell:
        node = workload.language == "nodejs"
        before = self._cpu(node)
        async with sandboxd_clients(
            daemon.socket, workload, clients, self.args.connections
        ) as runners:
            tally, seconds = await run_cell(runners, _budget(self.args))
        if before is not None:
            await trio.sleep(CPU_SETTLE_SECONDS)
        after = self._cpu(node)
        if daemon.process is not None and daemon.process.returncode is not None:
            raise daemons.DaemonFailed(
                f"the daemon exited with {daemon.process.returncode} during "
                f"{workload.title}:\n" + daemons.log_tail(daemon.log)
            )
        cell = summarize(self.system, workload.title, clients, tally, seconds)
        if before is None or after is None:
            return cell
        split = cpu.breakdown(before, after, tally.cpu_runs, tally.cpu_ms)
        return msgspec.structs.replace(cell, cpu=split)

    def _cpu(self, node: bool) -> cpu.Snapshot | None:
        if self.tree is None or self.pid is None:
            return None
        return cpu.take(self.tree, self.pid, node)


async def baseline_cells(
    args: argparse.Namespace, workloads: list[Workload], progress: Progress
) -> list[Cell]:
    cells = []
    for baseline in BASELINES:
        for workload in (w for w in workloads if w.language == baseline.language):
            cells += await _baseline_workload(args, baseline, workload, progress)
    return cells


async def _baseline_workload(
    args: argparse.Namespace, baseline: Baseline, workload: Workload, progress: Progress
) -> list[Cell]:
    cells = []
    if not Path(baseline.argv[0]).exists():
        reason = f"n/a ({baseline.argv[0]} missing)"
        return [unavailable(baseline.name, workload.title, c, reason) for c in args.clients]
    env = BASELINE_ENV
    if workload.science:
        if baseline.name != "python3 -c":
            reason = "n/a (binds no jail environment)"
            return [unavailable(baseline.name, workload.title, c, reason) for c in args.clients]
        site = science.site_packages(args.state_dir)
        env = science.baseline_env(site, tempfile.mkdtemp(prefix="sandboxd-bench-mpl-"))
    warm = baseline_run(baseline, workload, env)
    for _ in range(min(args.warmup, 2)):
        await warm()
    for clients in args.clients:
        runners = [baseline_run(baseline, workload, env) for _ in range(clients)]
        tally, seconds = await run_cell(runners, _budget(args))
        cell = summarize(baseline.name, workload.title, clients, tally, seconds)
        progress.cell(cell)
        cells.append(cell)
    return cells


def _order(cells: list[Cell], workloads: list[Workload]) -> list[Cell]:
    """Rows grouped by workload, then clients; sandboxd first within a group."""
    titles = [w.title for w in workloads]
    systems = [SANDBOXD, ECHO, *(b.name for b in BASELINES)]
    return sorted(
        cells, key=lambda c: (titles.index(c.workload), c.clients, systems.index(c.system))
    )


async def bench(args: argparse.Namespace, argv: Sequence[str]) -> Report:
    progress = Progress()
    iterations, loop_ms = calibrate_loop()
    progress.say(f"~5 ms loop: {iterations} iterations ({loop_ms:.2f} ms here)")
    workloads = all_workloads(iterations)
    if args.workloads:
        known = workloads + science_workloads()
        unknown = set(args.workloads) - {w.key for w in known}
        if unknown:
            raise SystemExit(f"unknown workloads: {', '.join(sorted(unknown))}")
        workloads = [w for w in known if w.key in args.workloads]
    floors = floor.measure()
    for cost in floors:
        progress.say(f"floor: {cost.name}: {cost.cpu_ms:.3f} ms CPU, {cost.wall_ms:.3f} ms wall")
    tree = None
    if args.start_daemon and not args.echo:
        tree = cpu.TreeCgroup(f"sandboxd-bench.{os.getpid()}")
    ours = DaemonBench(args, workloads, progress, tree)
    daemon_exit = None
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as temp:
        if not args.start_daemon:
            await ours.run(daemons.running_daemon(args.socket))
        else:
            socket = args.socket or f"{temp}/sandboxd.sock"
            command = _daemon_command(args, Path(temp), socket, workloads)
            if tree is not None:
                command = tree.wrap(command)
            progress.say(f"starting: {shlex.join(command)}")
            async with daemons.started(
                command, socket, Path(temp) / "daemon.log", args.start_timeout, stop_timeout=15.0
            ) as daemon:
                await ours.run(daemon)
            daemon_exit = daemons.exit_problem(daemon)
            if tree is not None and not tree.remove():
                progress.say(f"cgroup {tree.path} still busy: left in place")
            if daemon_exit is not None:
                progress.say(f"daemon stop FAILED: {daemon_exit}")
    cells = ours.cells
    if args.baselines:
        cells += await baseline_cells(args, workloads, progress)
    cells = _order(cells, workloads)
    found = ratios(cells, ours.system)
    return Report(
        command=shlex.join(["python", "-m", "bench", *argv]),
        system=ours.system,
        loop_iterations=iterations,
        loop_ms=loop_ms,
        cells=cells,
        ratios=found,
        daemon_pid=ours.pid,
        idle_rss_kib_after_warmup=ours.rss_warm,
        idle_rss_kib_after_bench=ours.rss_after,
        daemon_exit=daemon_exit,
        targets=targets(cells, ours.rss_warm, found, loop_ms) if not args.echo else [],
        floor=floors,
    )


def _daemon_command(
    args: argparse.Namespace, temp: Path, socket: str, workloads: list[Workload]
) -> list[str]:
    if args.echo:
        answers = temp / "answers.json"
        known = [*workloads, READY]
        answers.write_text(json.dumps({w.code: w.expected for w in known}))
        return daemons.echo_command(socket, answers)
    config = temp / "sandboxd.toml"
    runtime = temp / "run"
    runtime.mkdir()
    daemons.write_config(args.daemon_config, socket, str(runtime), config)
    return daemons.daemon_command(config, socket, args.state_dir)


def _soak(args: argparse.Namespace) -> int:
    plan = SoakPlan(
        seconds=args.soak,
        kill_every=args.soak_kill_every,
        zygote_every=args.soak_zygote_every,
        sample_every=args.soak_sample_every,
        uid_min=args.soak_uid_min,
        state_dir=args.state_dir,
    )
    try:
        run = trio.run(soak, plan)
    except daemons.DaemonFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print(run.report(plan.seconds))
    return 0 if run.passed() else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.soak is not None:
        return _soak(args)
    try:
        report = trio.run(bench, args, argv)
    except daemons.DaemonFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(to_json(report).decode() + "\n" if args.json else render(report) + "\n")
    failed = sum(c.errors for c in report.cells)
    if failed:
        print(f"bench: {failed} runs failed (see errors above)", file=sys.stderr)
    if report.daemon_exit is not None:
        print("bench: the daemon did not stop cleanly (see above)", file=sys.stderr)
    return 1 if failed or report.daemon_exit is not None else 0
