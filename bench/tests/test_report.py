"""Verdicts, ratios and the table say what happened, failures included."""

from __future__ import annotations

from msgspec.structs import replace

from bench.client import Answer, ErrorInfo
from bench.cpu import ROLES, Breakdown
from bench.report import Report, error_rows, ratios, render, targets
from bench.stats import Cell, Tally, summarize, unavailable
from bench.systems import judge_answer, judge_process
from bench.workloads import READY


def _cell(system: str, p50_ms: float, runs: int, clients: int = 1) -> Cell:
    tally = Tally()
    for _ in range(runs):
        tally.ok(p50_ms / 1000)
    return summarize(system, "python3 hello", clients, tally, seconds=1.0)


def test_ok_run_with_the_expected_stdout_passes() -> None:
    assert judge_answer(Answer(id=1, status="ok", stdout="hello\n"), "hello\n") == ""


def test_ok_status_with_wrong_stdout_is_an_error() -> None:
    assert "wrong stdout" in judge_answer(Answer(id=1, status="ok", stdout="hi\n"), "hello\n")


def test_non_ok_status_is_an_error_that_names_it_and_the_stderr() -> None:
    answer = Answer(id=1, status="blocked_syscall", signal=31, stderr="Bad system call")
    problem = judge_answer(answer, "hello\n")
    assert "status blocked_syscall" in problem
    assert "Bad system call" in problem


def test_error_reply_is_an_error_that_names_its_code() -> None:
    answer = Answer(id=1, error=ErrorInfo(code="overloaded", message="queue full"))
    assert judge_answer(answer, "hello\n") == "error reply overloaded: queue full"


def test_baseline_exit_status_and_stdout_are_both_checked() -> None:
    assert judge_process(0, b"hello\n", b"", "hello\n") == ""
    assert judge_process(1, b"hello\n", b"boom", "hello\n").startswith("exit 1")
    assert "wrong stdout" in judge_process(0, b"", b"", "hello\n")


def test_ratios_compare_each_baseline_with_sandboxd_at_the_same_clients() -> None:
    cells = [_cell("sandboxd", 2.0, 400), _cell("python3 -c", 20.0, 40)]
    (ratio,) = ratios(cells)
    assert ratio.baseline == "python3 -c"
    assert ratio.latency == 10.0
    assert ratio.throughput == 10.0


def test_unavailable_rows_are_printed_with_their_reason() -> None:
    report_cells = [
        _cell("sandboxd", 1.0, 10),
        unavailable("sandboxd", "nodejs hello", 1, "n/a (node pool not available)"),
    ]
    report = Report(
        command="python -m bench",
        system="sandboxd",
        loop_iterations=1,
        loop_ms=5.0,
        cells=report_cells,
        ratios=[],
        daemon_pid=1,
        idle_rss_kib_after_warmup=40 * 1024,
        idle_rss_kib_after_bench=None,
        daemon_exit=None,
        targets=targets(report_cells, 40 * 1024),
    )
    text = render(report)
    (row,) = [line for line in text.splitlines() if line.startswith("sandboxd  nodejs")]
    assert row.split() == [
        "sandboxd",
        "nodejs",
        "hello",
        "1",
        *["n/a", "(node", "pool", "not", "available)"],
    ]
    assert "idle RSS after warm-up: 40.0 MB" in text


def test_errors_are_listed_under_the_table() -> None:
    tally = Tally()
    tally.error("status timeout (exit None, signal 9): ''")
    tally.error("status timeout (exit None, signal 9): ''")
    cell = summarize("sandboxd", READY.title, 4, tally, seconds=1.0)
    assert error_rows([cell]) == [
        "sandboxd / ready probe / 4 clients: 2 x status timeout (exit None, signal 9): ''"
    ]


def test_targets_flag_a_missed_latency_and_a_met_memory_bound() -> None:
    found = {t.name: t for t in targets([_cell("sandboxd", 3.0, 100)], 50 * 1024)}
    assert found["python3 hello p50, 1 client"].met is False
    assert found["idle daemon RSS"].met is True
    assert found["nodejs hello p50, 1 client"].met is None


def test_targets_judge_cpu_per_run_and_the_ratios_to_the_baselines() -> None:
    split = Breakdown(
        runs=100,
        roles=dict.fromkeys(ROLES, 0.9),
        total_ms=4.5,
        kernel_threads_ms=0.0,
        ready_workers=2,
    )
    ours = replace(_cell("sandboxd", 2.0, 400, clients=4), cpu=split)
    plain = _cell("python3 -c", 8.0, 100, clients=4)
    found = {t.name: t for t in targets([ours, plain], None, ratios([ours, plain]))}
    assert found["python3 hello CPU per run"].met is False
    assert found["python3 hello CPU per run"].measured == "4.50 ms"
    assert found["python3 hello throughput"].met is True  # 400 runs/s against 100
    assert found["python3 hello, 4 clients"].met is True
    assert found["nodejs hello throughput"].met is None


def test_science_targets_are_judged_only_when_their_workloads_ran() -> None:
    numpy = replace(_cell("sandboxd", 4.0, 50), workload="python3 numpy")
    plot = replace(_cell("sandboxd", 75.0, 50), workload="python3 plot as PNG")
    found = {t.name: t for t in targets([numpy, plot], None)}
    assert found["python3 numpy p50, 1 client"].met is True
    assert found["python3 plot as PNG p50, 1 client"].met is False
    assert found["python3 plot as PNG p50, 1 client"].limit == "<= 60 ms"
    assert "python3 pandas DataFrame p50, 1 client" not in found
    assert not any("numpy" in t.name for t in targets([_cell("sandboxd", 1.0, 10)], None))
