"""SIGHUP reload: a new generation of pools, in-flight runs finish, no request is lost."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from tests.integration.conftest import start_daemon, stop_daemon


def test_reload_under_load_loses_nothing_and_applies_the_new_config(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "[python3]\npool_size = 2\n")
    try:
        slow: dict[str, object] = {}
        thread = threading.Thread(
            target=lambda: slow.update(daemon.run("import time; time.sleep(1); print('slow')"))
        )
        thread.start()
        config = Path(daemon.config_path)
        config.write_text(config.read_text().replace("pool_size = 2", "pool_size = 3"))
        daemon.process.send_signal(signal.SIGHUP)
        answers = [daemon.run(f"print({i})") for i in range(30)]
        thread.join()
        assert [a["stdout"] for a in answers] == [f"{i}\n" for i in range(30)]
        assert slow["status"] == "ok" and slow["stdout"] == "slow\n", slow
        daemon.wait_for_log("reloaded: python3 x3")
        daemon.assert_healthy()
    finally:
        stop_daemon(daemon)
    assert daemon.process.returncode == 0


def test_reload_with_a_broken_config_keeps_serving(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    try:
        Path(daemon.config_path).write_text("[limits]\nmax_workers = 'many'\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for_log("reload refused")
        assert "limits.max_workers" in daemon.log_path.read_text()
        daemon.assert_healthy()
    finally:
        stop_daemon(daemon)
