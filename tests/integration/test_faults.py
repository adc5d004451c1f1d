"""Faults heal themselves: kill -9 of the zygote, of workers, of node workers and
of the daemon itself. Every request gets an answer (a result or a typed
error), python3 is served again without a reload, and nothing is left behind."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.science import zygote_and_template
from sandboxd.jail import network
from tests.integration.conftest import Daemon, start_daemon, stop_daemon

STATUSES = {
    "ok",
    "error",
    "timeout",
    "memory",
    "tasks",
    "output_limit",
    "blocked_syscall",
    "killed",
}
# Typed errors a fault may cost a request; never silence, never an untyped failure.
FAULT_ERRORS = {"overloaded", "internal"}
HEAL_BOUND = 30.0


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(child) for child in handle.read().split())
    except FileNotFoundError:
        pass
    return found


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return b""


def zygote_of(daemon: Daemon) -> int:
    # Not one of the workers: they are the daemon's children too, with the same cmdline.
    zygote, _ = zygote_and_template(daemon.process.pid)
    assert zygote is not None, "the daemon has no zygote"
    return zygote


def uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def workers_of(daemon: Daemon) -> list[int]:
    """Host pids of this daemon's live jailed workers (their uids are its [jail] range).
    A ready worker killed in its pool is the daemon's zombie, its uid still held, until
    the pool's sweep or a take() reaps it (Pool._sweep, Pool.take): it runs nothing."""
    found = []
    for name in os.listdir("/proc"):
        uid = uid_of(int(name)) if name.isdigit() else None
        if uid is not None and daemon.uid_min <= uid <= daemon.uid_max and not zombie(int(name)):
            found.append(int(name))
    return found


class Load:
    """Clients in threads, each sending one request per connection until stopped;
    every outcome is counted: a status, an error code, or "silent"."""

    def __init__(self, daemon: Daemon, requests: list[dict[str, Any]], clients: int = 4) -> None:
        self.daemon = daemon
        self.requests = requests
        self.outcomes: Counter[str] = Counter()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]

    def _one(self, payload: dict[str, Any]) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(self.daemon.socket_path)
            sock.sendall(json.dumps(payload).encode() + b"\n")
            data = bytearray()
            while b"\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return "silent"
                data += chunk
        answer = json.loads(data.split(b"\n", 1)[0])
        if "error" in answer:
            return f"error:{answer['error']['code']}"
        return str(answer["status"])

    def _client(self, number: int) -> None:
        count = 0
        while not self.stop.is_set():
            payload = self.requests[(number + count) % len(self.requests)]
            count += 1
            outcome = self._one(payload)
            with self._lock:
                self.outcomes[outcome] += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def total(self) -> int:
        with self._lock:
            return sum(self.outcomes.values())

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 60
        while self.total() < count:
            assert time.monotonic() < deadline, f"load stalled: {self.outcomes}"
            time.sleep(0.01)


def assert_all_answered(outcomes: Counter[str]) -> None:
    assert outcomes["silent"] == 0, outcomes
    for outcome in outcomes:
        assert outcome in STATUSES or outcome.removeprefix("error:") in FAULT_ERRORS, outcomes


def wait_until(condition: Callable[[], bool], what: str, timeout: float = HEAL_BOUND) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def v1_cgroups(daemon: Daemon, generation: int) -> list[str]:
    return [
        path
        for controller in ("memory", "pids")
        if os.path.exists(
            path := f"/sys/fs/cgroup/{controller}/sandboxd.{daemon.process.pid}/g{generation}"
        )
    ]


HELLO = {"language": "python3", "code": "print('hello')"}
SLOW = {"language": "python3", "code": "import time; time.sleep(0.4); print('slow')"}


def test_a_killed_zygote_is_replaced_without_a_reload(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "[python3]\npool_size = 2\n")
    try:
        daemon.assert_healthy()  # warm: the first generation serves
        first = zygote_of(daemon)
        with Load(daemon, [HELLO, SLOW, HELLO]) as load:
            load.wait_for(20)
            os.kill(first, signal.SIGKILL)
            killed_at = time.monotonic()
            # Served again: a request sent after the kill gets its result.
            healed = wait_until(
                lambda: daemon.run("print('back')").get("stdout") == "back\n",
                "python3 served again after the zygote was killed",
            )
            print(f"python3 served again {time.monotonic() - killed_at:.3f} s after the kill")
            before = load.total()
            load.wait_for(before + 20)
        assert_all_answered(load.outcomes)
        # No fail-fast loop: the fault cost a few requests at most, never thousands.
        assert sum(n for o, n in load.outcomes.items() if o.startswith("error:")) <= 8, (
            load.outcomes
        )
        assert load.outcomes["ok"] > 40, load.outcomes
        assert zygote_of(daemon) != first
        assert healed < HEAL_BOUND
        # The dead generation's workers were retired (the daemon reaps them), and its
        # uids and cgroups went with them.
        wait_until(lambda: v1_cgroups(daemon, 1) == [], "generation 1's cgroups removed")
        log = daemon.log_path.read_text()
        assert "uid stays reserved" not in log, log
        assert "healed: generation" in log
        daemon.assert_healthy()
    finally:
        stop_daemon(daemon)
    assert daemon.process.returncode == 0


def test_runs_on_workers_finish_when_their_zygote_dies(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "[python3]\npool_size = 2\n")
    try:
        daemon.assert_healthy()  # warm: the first generation serves
        answers: list[dict[str, Any]] = []
        code = "import time; time.sleep(1.5); print('finished')"
        threads = [
            threading.Thread(target=lambda: answers.append(daemon.run(code))) for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        # Both runs took a worker: the emptied pool has ordered two more.
        wait_until(lambda: len(workers_of(daemon)) >= 4, "both runs on workers")
        os.kill(zygote_of(daemon), signal.SIGKILL)
        for thread in threads:
            thread.join()
        assert [a.get("stdout") for a in answers] == ["finished\n"] * 2, answers
        daemon.assert_healthy()
    finally:
        stop_daemon(daemon)


def kill_random(daemon: Daemon, chooser: random.Random) -> None:
    pids = workers_of(daemon)
    if pids:
        try:
            os.kill(chooser.choice(pids), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("language", ["python3", "nodejs"])
def test_killing_random_workers_costs_only_their_runs(
    tmp_path: Path, language: str
) -> None:
    # Pools of 2 and 2, no data-science pool: 4 ready workers when all is well.
    pools = '[python3]\npool_size = 2\nwarm_modules = ""\n[nodejs]\npool_size = 2\n'
    daemon = start_daemon(tmp_path, pools)
    chooser = random.Random(10)
    code = "console.log('hello')" if language == "nodejs" else "print('hello')"
    slow = (
        "setTimeout(() => console.log('slow'), 300)"
        if language == "nodejs"
        else "import time; time.sleep(0.3); print('slow')"
    )
    requests = [{"language": language, "code": code}, {"language": language, "code": slow}]
    try:
        daemon.assert_healthy()
        with Load(daemon, requests) as load:
            load.wait_for(10)
            for _ in range(30):
                kill_random(daemon, chooser)
                time.sleep(0.1)
            load.wait_for(load.total() + 10)
        assert_all_answered(load.outcomes)
        assert load.outcomes["ok"] > 10, load.outcomes
        answer = daemon.run(code, language=language)
        assert answer["status"] == "ok", answer
        # Every killed worker's uid came back: none is logged as kept.
        wait_until(lambda: len(workers_of(daemon)) <= 4, "only the ready workers remain")
        assert "uid stays reserved" not in daemon.log_path.read_text()
        daemon.assert_healthy()
    finally:
        stop_daemon(daemon)


ALLOW = '[network]\nmode = "allow"\n'
SLEEPER = {"language": "python3", "code": "import time; time.sleep(30)"}
CLOCK_NANOSLEEP = 230  # x86_64


def sleeping(pids: list[int]) -> list[int]:
    """Those of `pids` blocked in clock_nanosleep (a run inside time.sleep)."""
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/syscall") as handle:
                if handle.read().split(" ", 1)[0] == str(CLOCK_NANOSLEEP):
                    found.append(pid)
        except OSError:
            continue
    return found


def leftovers_of(pid: int, runtime_dir: str) -> list[str]:
    """Every host object a daemon `pid` makes, that exists now."""
    found = [
        path
        for controller in ("memory", "pids", "cpu", "cpuacct")
        if os.path.exists(path := f"/sys/fs/cgroup/{controller}/sandboxd.{pid}")
    ]
    if os.path.exists(f"/sys/class/net/{network.LINK_PREFIX}{pid}h"):
        found.append(f"link {network.LINK_PREFIX}{pid}h")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    if f"{network.TABLE_PREFIX}{pid}" in tables.stdout:
        found.append(f"table {network.TABLE_PREFIX}{pid}")
    runtime = os.path.realpath(runtime_dir)
    with open("/proc/self/mountinfo") as mounts:
        found += [f"mount {m}" for line in mounts if (m := line.split()[4]).startswith(runtime)]
    return found


def test_a_start_removes_what_a_killed_daemon_left_and_spares_a_live_neighbour(
    tmp_path: Path,
) -> None:
    killed = start_daemon(tmp_path / "killed", ALLOW)
    neighbour = start_daemon(tmp_path / "neighbour", ALLOW)
    try:
        killed.assert_healthy()
        neighbour.assert_healthy()
        # Runs in flight, on workers in cgroups, with and without network.
        clients = []
        for payload in (SLEEPER, {**SLEEPER, "enable_network": True}):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(killed.socket_path)
            client.sendall(json.dumps(payload).encode() + b"\n")
            clients.append(client)
        wait_until(lambda: len(sleeping(workers_of(killed))) == 2, "both runs asleep")
        killed.process.kill()
        killed.process.wait()
        for client in clients:
            client.close()
        pid = killed.process.pid
        assert leftovers_of(pid, killed.runtime_dir), "the kill left nothing to clean up"
        mine = leftovers_of(neighbour.process.pid, neighbour.runtime_dir)
        restarted = start_daemon(tmp_path / "restarted")
        try:
            restarted.assert_healthy()
            assert leftovers_of(pid, killed.runtime_dir) == []
            # The live neighbour's objects stay, and it goes on serving.
            assert leftovers_of(neighbour.process.pid, neighbour.runtime_dir) == mine
            neighbour.assert_healthy()
            assert workers_of(killed) == [], "the killed daemon's workers outlived it"
        finally:
            stop_daemon(restarted)
    finally:
        stop_daemon(neighbour)
