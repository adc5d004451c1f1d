"""The CPU breakdown: every role present, adding up to the CPU the kernel counted.

The end-to-end test runs the bench against a real daemon (root, node); the
property test checks the arithmetic for any counters.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from bench.cpu import (
    PIDS,
    ROLES,
    Snapshot,
    TreeCgroup,
    breakdown,
    is_ready,
    live_threads_ns,
    take,
)
from bench.floor import OPERATIONS

ROOT = Path(__file__).resolve().parents[2]
# A uid block of its own, far above the integration tests' blocks from the same base.
UID_OFFSET = 990_000


def _config(tmp_path: Path) -> Path:
    base = int(os.environ.get("SANDBOXD_TEST_UID_BASE", "200000")) + UID_OFFSET
    config = tmp_path / "bench.toml"
    config.write_text(f"[jail]\nuid_min = {base}\nuid_max = {base + 999}\n")
    return config


def test_bench_against_a_real_daemon_splits_its_cpu_into_every_role(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench", "--no-baselines", "--json", "--warmup", "1"]
    argv += ["--workloads", "py-hello,node-hello", "--clients", "1,2", "--runs", "20"]
    argv += ["--daemon-config", str(_config(tmp_path))]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    cells = report["cells"]
    assert [(c["workload"], c["clients"]) for c in cells] == [
        ("python3 hello", 1), ("python3 hello", 2), ("nodejs hello", 1), ("nodejs hello", 2),
    ]  # fmt: skip
    for cell in cells:
        split = cell["cpu"]
        assert split is not None, cell
        assert list(split["roles"]) == list(ROLES)
        assert math.isclose(sum(split["roles"].values()), split["total_ms"], abs_tol=1e-6)
        assert split["runs"] == cell["runs"] == 20
        # The kernel counted CPU for every part a run has: the daemon's protocol work,
        # the zygote's fork, a worker's preparation and its job.
        for role in ("daemon", "zygote", "worker before job", "worker job+exit"):
            assert split["roles"][role] > 0, (cell["workload"], role, split)
        assert split["ready_workers"] > 0
    assert [cost["name"] for cost in report["floor"]] == [name for name, *_ in OPERATIONS]
    assert all(cost["cpu_ms"] > 0 and cost["wall_ms"] > 0 for cost in report["floor"])


def test_tree_cgroup_counts_a_wrapped_command_and_its_children() -> None:
    tree = TreeCgroup(f"sandboxd-bench-test.{os.getpid()}")
    try:
        burn = "import os\nfor _ in range(2):\n    if os.fork() == 0:\n"
        burn += "        sum(range(2_000_000)); os._exit(0)\n    os.wait()\n"
        done = subprocess.run(tree.wrap([sys.executable, "-c", burn]), check=False)
        assert done.returncode == 0
        # Two children summing 2,000,000 integers each: their CPU is in the tree's count
        # though both were reaped and their parent is gone.
        assert tree.usage_ns() > 0
        snapshot = take(tree, os.getpid(), node=False)
        assert snapshot.tree_ns == tree.usage_ns()
        assert snapshot.like_workers == 0
        assert tree.members() == []
    finally:
        tree.remove()
    assert not os.path.exists(tree.path)


def test_only_workers_that_said_ready_give_the_mean_before_the_job() -> None:
    # A stand-in daemon's per-run pids cgroups (cpu.worker_leaves reads its leaves): a
    # process asleep in a read, as a ready worker is; one that keeps computing, as one
    # running its job; and one asleep that holds fd 3, as a worker not ready yet.
    fake_daemon = os.getpid()
    top = Path(PIDS, f"sandboxd.{fake_daemon}", "g1")
    sleep = "import sys; sys.stdin.read()"
    hold_fd_3 = "import os; os.dup2(os.open('/dev/null', os.O_RDONLY), 3); " + sleep
    sleeper = subprocess.Popen([sys.executable, "-c", sleep], stdin=subprocess.PIPE)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    unready = subprocess.Popen([sys.executable, "-c", hold_fd_3], stdin=subprocess.PIPE)
    children = (sleeper, spinner, unready)
    tree = TreeCgroup(f"sandboxd-bench-test.{os.getpid()}")
    try:
        for number, child in enumerate(children):
            leaf = top / f"w{number}"
            leaf.mkdir(parents=True)
            (leaf / "cgroup.procs").write_text(str(child.pid))
        for _ in range(500):  # until both interpreters have started and sleep
            if is_ready(sleeper.pid) and _asleep(unready.pid):
                break
            time.sleep(0.01)
        assert is_ready(sleeper.pid)
        assert not is_ready(spinner.pid)
        assert not is_ready(unready.pid) and _asleep(unready.pid)
        snapshot = take(tree, fake_daemon, node=False)
        assert snapshot.like_workers == 1
        # The sleeper's whole start-up: an interpreter's start is milliseconds of CPU.
        assert snapshot.like_ns == live_threads_ns(sleeper.pid) > 1_000_000
        assert take(tree, fake_daemon, node=True).like_workers == 0
    finally:
        for child in children:
            child.kill()
            child.wait()
            if child.stdin is not None:
                child.stdin.close()
        for number in range(len(children)):
            with contextlib.suppress(FileNotFoundError):
                (top / f"w{number}").rmdir()
        top.rmdir()
        top.parent.rmdir()
        tree.remove()


def _asleep(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "S"


_counts = st.integers(min_value=0, max_value=10**12)


@st.composite
def _snapshots(draw: st.DrawFn) -> Snapshot:
    return Snapshot(
        tree_ns=draw(_counts),
        daemon_ns=draw(_counts),
        others=draw(st.dictionaries(st.integers(1, 50), _counts, max_size=4)),
        ready_ns=draw(_counts),
        like_ns=draw(_counts),
        like_workers=draw(st.integers(min_value=0, max_value=64)),
        kernel_threads_ns=draw(_counts),
    )


@given(
    _snapshots(),
    _snapshots(),
    st.integers(min_value=0, max_value=10**6),
    st.floats(min_value=0, max_value=1e7),
)
def test_roles_always_add_up_to_the_trees_count(
    before: Snapshot, after: Snapshot, runs: int, runs_cpu_ms: float
) -> None:
    split = breakdown(before, after, runs, runs_cpu_ms)
    assert list(split.roles) == list(ROLES)
    scale = max(1.0, abs(split.total_ms), *(abs(v) for v in split.roles.values()))
    assert math.isclose(sum(split.roles.values()), split.total_ms, abs_tol=1e-9 * scale)
