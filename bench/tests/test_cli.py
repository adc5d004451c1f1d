"""`python -m bench` end to end against the echo stand-in (no daemon, no runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_echo_bench_reports_every_cell_with_exactly_its_runs_and_no_errors() -> None:
    argv = [sys.executable, "-m", "bench", "--echo", "--no-baselines", "--json"]
    argv += ["--runs", "30", "--clients", "1,3", "--warmup", "1"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    cells = report["cells"]
    assert len(cells) == 5 * 2
    assert {c["runs"] for c in cells} == {30}
    assert {c["errors"] for c in cells} == {0}
    assert {c["system"] for c in cells} == {"echo (runs nothing)"}
    assert report["idle_rss_kib_after_warmup"] > 0


def test_no_start_daemon_without_a_socket_is_a_usage_error() -> None:
    argv = [sys.executable, "-m", "bench", "--no-start-daemon"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=60, check=False)
    assert done.returncode == 2
    assert b"--no-start-daemon needs --socket" in done.stderr
