"""One uid range, one daemon: a daemon refuses a [jail] range that overlaps a live one's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sandboxd.jail.identity import UID_LOCK_DIR
from tests.integration.conftest import (
    UID_BLOCK,
    _uid_blocks,
    serve_command,
    start_daemon,
    stop_daemon,
)


def _serve_with_range(
    base: Path, config_path: str, uid_min: int, uid_max: int
) -> subprocess.CompletedProcess[str]:
    """`sandboxd serve` with another daemon's config file but the given uid range."""
    base.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [
            *serve_command(
                config_path, str(base / "s.sock"), str(base / "run"), str(base / "state")
            ),
            "--http",
            "none",
        ],
        env={
            "PATH": "/usr/bin:/bin",
            "SANDBOXD_JAIL_UID_MIN": str(uid_min),
            "SANDBOXD_JAIL_UID_MAX": str(uid_max),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_daemon_refuses_a_uid_range_overlapping_a_live_daemons(tmp_path: Path) -> None:
    first = start_daemon(tmp_path / "first")
    try:
        middle = (first.uid_min + first.uid_max) // 2
        second = _serve_with_range(tmp_path / "second", first.config_path, middle, middle + 5000)
        assert second.returncode == 1, second
        assert f"{first.uid_min}..{first.uid_max}" in second.stderr, second.stderr
        assert f"pid {first.process.pid}" in second.stderr, second.stderr
        first.assert_healthy()
    finally:
        stop_daemon(first)
    assert not os.path.exists(f"{UID_LOCK_DIR}/{first.uid_min}-{first.uid_max}.lock")


def test_daemons_with_disjoint_uid_ranges_both_serve(tmp_path: Path) -> None:
    first = start_daemon(tmp_path / "first")
    try:
        second = start_daemon(tmp_path / "second")
        try:
            assert second.uid_min > first.uid_max
            first.assert_healthy()
            second.assert_healthy()
        finally:
            stop_daemon(second)
    finally:
        stop_daemon(first)


def test_lock_left_by_a_killed_daemon_does_not_block_its_range(tmp_path: Path) -> None:
    uid_min = next(_uid_blocks)
    uid_max = uid_min + UID_BLOCK - 1
    claim_and_die = (
        "import os; from sandboxd.jail.identity import claim_uid_range;"
        f" claim_uid_range({uid_min}, {uid_max}); os.kill(os.getpid(), 9)"
    )
    died = subprocess.run([sys.executable, "-c", claim_and_die], check=False)
    assert died.returncode == -9
    assert os.path.exists(f"{UID_LOCK_DIR}/{uid_min}-{uid_max}.lock")  # stale: no flock on it
    env = {"SANDBOXD_JAIL_UID_MIN": str(uid_min), "SANDBOXD_JAIL_UID_MAX": str(uid_max)}
    daemon = start_daemon(tmp_path / "daemon", env=env)
    try:
        daemon.assert_healthy()
    finally:
        stop_daemon(daemon)
