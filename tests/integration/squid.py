"""A real squid (Debian's package) for the proxy egress tests: own config, port, pid file.

Fails loudly when squid is not installed (`make apt` installs it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SQUID = "/usr/sbin/squid"
START_TIMEOUT = 60.0


@dataclass
class Squid:
    process: subprocess.Popen[bytes]
    port: int
    base: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # shutdown_lifetime 0: at once
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")
            for path in (self.base / "cache.log", self.base / "access.log")
            if path.exists()
        )


def config(base: Path, port: int, allowed: list[str]) -> str:
    """Squid for tests: the sample's shape (allow-list by dstdomain, deny the rest), with
    hosts_file mapping the test domains to this machine, where the test servers listen."""
    return (
        f"http_port 127.0.0.1:{port}\n"
        f"pid_filename {base}/squid.pid\n"
        f"cache_log {base}/cache.log\n"
        f"access_log stdio:{base}/access.log\n"
        "cache_store_log none\n"
        "netdb_filename none\n"
        "pinger_enable off\n"
        f"coredump_dir {base}\n"
        f"hosts_file {base}/hosts\n"
        "shutdown_lifetime 0 seconds\n"
        "cache deny all\n"
        f"acl sandboxd_allowed dstdomain {' '.join(allowed)}\n"
        "http_access allow sandboxd_allowed\n"
        "http_access deny all\n"
    )


def start(port: int, allowed: list[str], hosts: dict[str, str]) -> Squid:
    """squid -N on 127.0.0.1:port; `hosts` maps names to addresses (squid's hosts_file).

    Its files live in a directory of its own under /tmp, owned by squid's user
    (pytest's directories are closed to it); stop() removes it.
    """
    if not os.path.exists(SQUID):
        pytest.fail("squid is not installed: apt install squid (make apt installs it)")
    base = Path(tempfile.mkdtemp(prefix="sandboxd-squid-"))
    (base / "hosts").write_text("".join(f"{ip} {name}\n" for name, ip in hosts.items()))
    (base / "squid.conf").write_text(config(base, port, allowed))
    proxy_user = pwd.getpwnam("proxy")  # squid drops to it when started as root
    shutil.chown(base, proxy_user.pw_uid, proxy_user.pw_gid)
    with (base / "stdout.log").open("wb") as out:
        process = subprocess.Popen(
            [SQUID, "-N", "-f", str(base / "squid.conf")],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    squid = Squid(process, port, base)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"squid exited at start:\n{(base / 'stdout.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return squid
        except OSError:
            time.sleep(0.1)
    squid.stop()
    pytest.fail(f"squid did not listen within {START_TIMEOUT}s:\n{squid.log()}")
