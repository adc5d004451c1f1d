"""Each workload's `expected` is what the real interpreter prints for its code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.systems import BASELINE_ENV
from bench.workloads import READY, Workload, all_workloads, calibrate_loop

INTERPRETERS = {"python3": ["/usr/bin/python3", "-c"], "nodejs": ["/usr/bin/node", "-e"]}
WORKLOADS = [*all_workloads(1000), READY]


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.key)
def test_expected_stdout_is_what_the_interpreter_prints(workload: Workload) -> None:
    argv = INTERPRETERS[workload.language]
    assert Path(argv[0]).exists(), f"{argv[0]} is needed to check the {workload.key} workload"
    done = subprocess.run(
        [*argv, workload.code], capture_output=True, env=BASELINE_ENV, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == workload.expected


def test_dify_python_template_prints_the_result_block_dify_parses() -> None:
    python = next(w for w in WORKLOADS if w.key == "py-dify")
    assert "def main(a, b):" in python.code
    assert python.expected == '<<RESULT>>{\n    "sum": 3\n}<<RESULT>>\n'


def test_keys_are_unique() -> None:
    keys = [w.key for w in WORKLOADS]
    assert len(keys) == len(set(keys))


def test_calibration_scales_the_loop_to_a_positive_iteration_count() -> None:
    iterations, measured_ms = calibrate_loop(target_ms=1.0, rounds=1)
    assert iterations > 0
    assert measured_ms > 0
