"""A real daemon, as root, on this host's kernel: namespaces, chroot, seccomp, cgroups.

These tests fail (they never skip) when not run as root: CI runs them as root.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandboxd import deps

API_KEY = "integration-test-key"
# How a test daemon's `sandboxd` is started: this checkout's package, by default.
SANDBOXD = (sys.executable, "-m", "sandboxd")
START_TIMEOUT = 60.0
# Each test daemon gets a uid range of its own, so no two daemons alive at once (in
# this session or in another test session started with another SANDBOXD_TEST_UID_BASE)
# ever hand the same uid to workers.
UID_BLOCK = 2000
_uid_blocks = itertools.count(int(os.environ.get("SANDBOXD_TEST_UID_BASE", "200000")), UID_BLOCK)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Daemon:
    socket_path: str
    http_url: str
    api_key: str
    process: subprocess.Popen[bytes]
    log_path: Path
    runtime_dir: str
    state_dir: str
    config_path: str
    # The daemon's [jail] uid_min..uid_max, inclusive.
    uid_min: int = 0
    uid_max: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def request(self, payload: dict[str, Any] | bytes, timeout: float = 60.0) -> dict[str, Any]:
        """One native request on a fresh connection; the answer as a dict."""
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            sock.sendall(raw)
            data = bytearray()
            while b"\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        assert data, "the daemon closed the connection without an answer"
        answer: dict[str, Any] = json.loads(data.split(b"\n", 1)[0])
        return answer

    def run(self, code: str, language: str = "python3", **fields: Any) -> dict[str, Any]:
        return self.request({"language": language, "code": code, **fields})

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        """Until the daemon's log holds `text` (a reload's outcome is only logged)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text():
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not in the daemon's log:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def assert_healthy(self) -> None:
        assert self.process.poll() is None, "the daemon died"
        answer = self.run("print('still here')")
        assert answer["status"] == "ok", answer
        assert answer["stdout"] == "still here\n"


def _wait_until_serving(daemon: Daemon) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            pytest.fail(f"daemon exited at start:\n{daemon.log_path.read_text()}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(daemon.socket_path)
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"daemon did not start in {START_TIMEOUT}s:\n{daemon.log_path.read_text()}")


def start_daemon(
    base: Path,
    config_text: str = "",
    env: dict[str, str] | None = None,
    state_dir: str | None = None,
    program: tuple[str, ...] = SANDBOXD,
) -> Daemon:
    """Start `sandboxd serve` (by `program`) with its own socket, dirs and port under `base`."""
    if os.geteuid() != 0:
        pytest.fail("the integration tests need root (they build real jails); run them as root")
    base.mkdir(parents=True, exist_ok=True)
    config_path = base / "sandboxd.toml"
    port = free_port()
    uid_min = next(_uid_blocks)
    uid_max = uid_min + UID_BLOCK - 1
    config_path.write_text(
        # [http] last, so keys at the top of config_text land in [http] (as callers expect).
        f"[jail]\nuid_min = {uid_min}\nuid_max = {uid_max}\n"
        f'[http]\nlisten = "127.0.0.1:{port}"\napi_key = "{API_KEY}"\n' + config_text
    )
    socket_path, runtime_dir = str(base / "sandboxd.sock"), str(base / "run")
    state_dir = state_dir or str(base / "state")
    log_path = base / "daemon.log"
    process = _launch(
        serve_command(str(config_path), socket_path, runtime_dir, state_dir, program),
        log_path,
        env,
    )
    daemon = Daemon(
        socket_path,
        f"http://127.0.0.1:{port}",
        API_KEY,
        process,
        log_path,
        runtime_dir,
        state_dir,
        str(config_path),
        uid_min,
        uid_max,
    )
    _wait_until_serving(daemon)
    return daemon


def restart_daemon(daemon: Daemon, env: dict[str, str] | None = None) -> None:
    """Start a stopped daemon again: same config, socket, dirs and port; same log file."""
    daemon.process = _launch(
        serve_command(daemon.config_path, daemon.socket_path, daemon.runtime_dir, daemon.state_dir),
        daemon.log_path,
        env,
    )
    _wait_until_serving(daemon)


def serve_command(
    config_path: str,
    socket_path: str,
    runtime_dir: str,
    state_dir: str,
    program: tuple[str, ...] = SANDBOXD,
) -> list[str]:
    """`sandboxd serve` of this checkout with its own config, socket and directories."""
    return [
        *program, "serve", "--config", config_path,
        "--socket", socket_path, "--runtime-dir", runtime_dir, "--state-dir", state_dir,
    ]  # fmt: skip


def _launch(
    command: list[str], log_path: Path, env: dict[str, str] | None
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin", **(env or {})},
        )


def stop_daemon(daemon: Daemon) -> None:
    """SIGTERM, then check that the daemon left no cgroup behind."""
    daemon.process.terminate()
    try:
        daemon.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        daemon.process.wait()
        pytest.fail("the daemon did not stop within 30 s of SIGTERM")
    leftovers = [
        path
        for controller in ("memory", "pids", "cpu", "cpuacct")  # cpuacct: older layouts
        if os.path.exists(path := f"/sys/fs/cgroup/{controller}/sandboxd.{daemon.process.pid}")
    ]
    assert leftovers == [], f"cgroups left behind: {leftovers}"


REQUIREMENTS = Path(__file__).parents[2] / "etc" / "sandboxd" / "python-requirements.txt"


@pytest.fixture(scope="session")
def python_deps_state(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A state dir whose python environment holds the default requirements (jinja2...)."""
    state = tmp_path_factory.mktemp("deps-state")
    deps.sync_python(str(state), str(REQUIREMENTS))
    return str(state)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, python_deps_state: str) -> Iterator[Daemon]:
    """One daemon shared by the tests that do not change its configuration."""
    running = start_daemon(tmp_path_factory.mktemp("daemon"), state_dir=python_deps_state)
    yield running
    stop_daemon(running)
    assert running.process.returncode == 0, running.log_path.read_text()
