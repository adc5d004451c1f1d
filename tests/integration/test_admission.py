"""Admission control and failing closed, against daemons of their own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest
import trio

from sandboxd.config import Config
from sandboxd.control import SpawnOrder
from sandboxd.daemon import build_spec
from sandboxd.generation import ZygoteHandle
from sandboxd.protocol import ProtocolError
from sandboxd.worker import WorkerHandle
from tests.integration.conftest import Daemon, start_daemon, stop_daemon

SMALL = """
[limits]
max_workers = 1
max_requests = 2
[python3]
pool_size = 1
[nodejs]
pool_size = 1
"""


@pytest.fixture(scope="module")
def small_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("small"), SMALL)
    yield running
    stop_daemon(running)


def test_requests_beyond_max_requests_are_refused_at_once(small_daemon: Daemon) -> None:
    def one(i: int) -> dict[str, object]:
        return small_daemon.run("import time; time.sleep(0.5); print('done')", id=i, timeout=10)

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(one, range(6)))
    refused = [a for a in answers if "error" in a]
    served = [a for a in answers if "error" not in a]
    assert refused, answers
    assert all(a["error"]["code"] == "overloaded" for a in refused)  # type: ignore[index]
    assert 1 <= len(served) <= 2
    assert all(a["stdout"] == "done\n" for a in served)
    small_daemon.assert_healthy()


def test_queue_wait_counts_against_the_timeout(small_daemon: Daemon) -> None:
    """Two 1 s runs with a 1.4 s budget through one slot: whichever waits runs out of time."""

    def one(i: int) -> dict[str, object]:
        return small_daemon.run("import time; time.sleep(1.0); print('done')", id=i, timeout=1.4)

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = sorted((a["status"] for a in pool.map(one, range(2))), key=str)
    assert answers == ["ok", "timeout"]


async def test_a_worker_whose_jail_setup_fails_never_runs_code(tmp_path: Path) -> None:
    """uid 4294967295 is not a valid owner for /tmp and is "leave unchanged" to setresuid:
    the jail must fail closed at the first step that uses it, naming that step."""
    if os.geteuid() != 0:
        pytest.fail("needs root")
    config = Config()
    spec, _ = build_spec(config, cgroups_in_force=False)
    spec = msgspec.structs.replace(spec, runtime_dir=str(tmp_path))
    zygote = ZygoteHandle(spec)
    await zygote.start()
    try:
        pid, fds = await zygote.spawn(SpawnOrder(1, "python3", 0xFFFFFFFF))
        worker = WorkerHandle(1, "python3", 0xFFFFFFFF, pid, fds, None, lambda: None)
        with pytest.raises(ProtocolError) as caught:
            with trio.fail_after(30):
                await worker.wait_ready()
        assert caught.value.code == "internal"
        assert caught.value.message.startswith("worker setup failed: filesystem:")
        await worker.close()
    finally:
        await zygote.stop()
