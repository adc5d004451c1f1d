"""[network] mode = "allow": runs that ask for network get egress, and nothing else.

There is no internet here, so the tests build their own: a "peer" network namespace
behind a veth from the host, at a 198.18.0.0/15 (benchmark range) address, serving a
marker file over HTTP. All traffic stays on addresses these tests or the daemon made.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandboxd.jail import network
from tests.integration.conftest import Daemon, free_port, start_daemon, stop_daemon

ALLOW = '[network]\nmode = "allow"\n'
SERVER_LIFETIME = "300"  # seconds, should the test process die without its teardown
CONNECT_TIMEOUT = 5


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass
class Peer:
    """A namespace on a /30 link from the host, serving `token` at http://address:port/."""

    netns: str
    host_if: str
    address: str
    port: int
    token: str
    server: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/marker.txt"


def _wait_for_server(address: str, port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail("the peer's HTTP server exited at start")
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"the peer's HTTP server at {address}:{port} did not come up")


MakePeer = Callable[[str, ipaddress.IPv4Network], Peer]


@pytest.fixture
def make_peer(tmp_path: Path) -> Iterator[MakePeer]:
    """make_peer(name, link) builds a peer; all of them are removed even on failure."""
    made: list[Peer] = []

    def make(name: str, link: ipaddress.IPv4Network) -> Peer:
        if os.geteuid() != 0:
            pytest.fail("these tests build network namespaces: run them as root")
        host_if, peer_if = f"sbxt{name}h", f"sbxt{name}p"
        netns = str(tmp_path / f"peer-{name}.net")
        Path(netns).touch()
        sh("unshare", f"--net={netns}", "true")
        host_address, address = str(link.network_address + 1), str(link.network_address + 2)
        peer = Peer(netns, host_if, address, free_port(), secrets.token_hex(8))
        made.append(peer)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", netns)
        sh("ip", "addr", "add", f"{host_address}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        # The host routes for this little internet: the peer's replies are forwarded.
        Path(f"/proc/sys/net/ipv4/conf/{host_if}/forwarding").write_text("1")
        inside = ("nsenter", f"--net={netns}", "--")
        sh(*inside, "ip", "addr", "add", f"{address}/30", "dev", peer_if)
        sh(*inside, "ip", "link", "set", peer_if, "up")
        site = tmp_path / f"site-{name}"
        site.mkdir()
        (site / "marker.txt").write_text(peer.token)
        peer.server = subprocess.Popen(
            [*inside, "timeout", SERVER_LIFETIME, "/usr/bin/python3", "-m", "http.server",
             "--bind", address, "--directory", str(site), str(peer.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_for_server(address, peer.port, peer.server)
        return peer

    yield make
    for peer in made:
        if peer.server is not None:
            peer.server.terminate()  # timeout(1) passes it on to the server
            peer.server.wait()
        subprocess.run(["ip", "link", "delete", peer.host_if], capture_output=True, check=False)
        subprocess.run(["umount", peer.netns], capture_output=True, check=False)


def peer_link(index: int) -> ipaddress.IPv4Network:
    """A /30 of 198.18.0.0/15 for this test process (index tells peers apart)."""
    return ipaddress.IPv4Network(f"198.18.{os.getpid() % 250}.{4 * index}/30")


def fetch_code(url: str) -> str:
    return (
        "import urllib.request\n"
        "try:\n"
        f"    print(urllib.request.urlopen({url!r}, timeout={CONNECT_TIMEOUT}).read().decode())\n"
        "except OSError as error:\n    print('unreachable:', error)\n"
    )


def probe_code(targets: list[tuple[str, int]]) -> str:
    """Prints REACHED host:port for every target that accepted a TCP connection."""
    return (
        "import socket\n"
        f"for host, port in {targets!r}:\n"
        "    try:\n"
        f"        socket.create_connection((host, port), timeout={CONNECT_TIMEOUT}).close()\n"
        "        print('REACHED', host, port)\n"
        "    except OSError as error:\n"
        "        print('refused', host, port, error)\n"
    )


def refusals(stdout: str) -> int:
    return sum(line.startswith("refused ") for line in stdout.splitlines())


def host_addresses() -> list[str]:
    return [
        info["local"]
        for link in json.loads(sh("ip", "-j", "-4", "addr", "show"))
        for info in link.get("addr_info", [])
    ]


@pytest.fixture
def allow_daemon(tmp_path: Path) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path / "daemon", ALLOW)
    try:
        yield daemon
    finally:
        stop_daemon(daemon)
    assert daemon.process.returncode == 0, daemon.log_path.read_text()


def run_ok(daemon: Daemon, code: str, enable_network: bool) -> str:
    answer = daemon.run(code, enable_network=enable_network)
    assert answer["status"] == "ok", answer
    return str(answer["stdout"])


def test_a_run_with_network_reaches_a_server_beyond_the_host(
    allow_daemon: Daemon, make_peer: MakePeer
) -> None:
    peer = make_peer("a", peer_link(0))
    assert run_ok(allow_daemon, fetch_code(peer.url), enable_network=True) == peer.token + "\n"


@pytest.mark.nodejs
def test_a_node_run_with_network_reaches_it_too(allow_daemon: Daemon, make_peer: MakePeer) -> None:
    peer = make_peer("n", peer_link(4))
    code = (
        "const http = require('http');\n"
        f"http.get({peer.url!r}, (response) => {{\n"
        "  let body = '';\n"
        "  response.on('data', (chunk) => { body += chunk; });\n"
        "  response.on('end', () => console.log(body));\n"
        "}).on('error', (error) => console.log('unreachable:', error.message));\n"
    )
    answer = allow_daemon.run(code, language="nodejs", enable_network=True)
    assert answer.get("status") == "ok" and answer["stdout"] == peer.token + "\n", answer


def test_egress_survives_a_reload(allow_daemon: Daemon, make_peer: MakePeer) -> None:
    peer = make_peer("r", peer_link(5))
    netns = network.netns_path(os.path.realpath(allow_daemon.runtime_dir), allow_daemon.process.pid)
    allow_daemon.process.send_signal(signal.SIGHUP)
    allow_daemon.wait_for_log("reloaded:")
    assert run_ok(allow_daemon, fetch_code(peer.url), enable_network=True) == peer.token + "\n"
    assert os.path.exists(netns)  # the same namespace, not a second one
    assert len([n for n in os.listdir(allow_daemon.runtime_dir) if n.endswith(".net")]) == 1


def test_a_run_without_network_does_not_reach_it(allow_daemon: Daemon, make_peer: MakePeer) -> None:
    peer = make_peer("b", peer_link(1))
    stdout = run_ok(allow_daemon, fetch_code(peer.url), enable_network=False)
    assert stdout.startswith("unreachable:") and peer.token not in stdout


def test_a_run_with_network_reaches_nothing_on_the_host(
    allow_daemon: Daemon, make_peer: MakePeer
) -> None:
    peer = make_peer("c", peer_link(2))
    daemon_port = int(allow_daemon.http_url.rsplit(":", 1)[1])
    with socket.socket() as host_service:
        host_service.bind(("0.0.0.0", 0))
        host_service.listen(16)
        service_port = host_service.getsockname()[1]
        addresses = host_addresses()
        veth = f"{network.LINK_PREFIX}{allow_daemon.process.pid}h"
        veth_address = json.loads(sh("ip", "-j", "-4", "addr", "show", "dev", veth))[0][
            "addr_info"
        ][0]["local"]
        assert veth_address in addresses and "127.0.0.1" in addresses
        # The host reaches its own service at every one of those addresses.
        for address in addresses:
            socket.create_connection((address, service_port), timeout=CONNECT_TIMEOUT).close()
        targets = [(a, p) for a in addresses for p in (service_port, daemon_port)]
        code = probe_code(targets) + fetch_code(peer.url)
        stdout = run_ok(allow_daemon, code, enable_network=True)
    assert "REACHED" not in stdout, stdout
    assert refusals(stdout) == len(targets), stdout
    assert stdout.endswith(peer.token + "\n"), "the same run still had egress"


def test_a_run_with_network_cannot_reach_another_egress_link(
    allow_daemon: Daemon, make_peer: MakePeer
) -> None:
    # Another daemon's link: a /30 of the same pool, with a server behind it.
    link = network.pick_link(os.getpid(), network.used_links())
    other = make_peer("d", link)
    peer = make_peer("e", peer_link(3))
    targets = [(str(link.network_address + 1), other.port), (other.address, other.port)]
    stdout = run_ok(allow_daemon, probe_code(targets) + fetch_code(peer.url), enable_network=True)
    assert "REACHED" not in stdout, stdout
    assert stdout.endswith(peer.token + "\n"), "the same run still had egress"


def test_runs_with_network_accept_no_connections(allow_daemon: Daemon) -> None:
    """Runs share the egress namespace: none may serve another, so none may listen (the
    nft input chain would drop the connection too; test_collusion_net.py tries both)."""
    code = (
        "import socket\n"
        "try:\n"
        "    server = socket.socket(); server.bind(('0.0.0.0', 0)); server.listen()\n"
        "    print('LISTENING', server.getsockname())\n"
        "except PermissionError as error:\n"
        "    print('refused', error)\n"
    )
    stdout = run_ok(allow_daemon, code, enable_network=True)
    assert "LISTENING" not in stdout and refusals(stdout) == 1, stdout


def test_stopping_the_daemon_removes_its_egress_network(tmp_path: Path) -> None:
    forwarding = Path("/proc/sys/net/ipv4/conf/all/forwarding").read_text()
    uplinks = {
        route["dev"]: Path(f"/proc/sys/net/ipv4/conf/{route['dev']}/forwarding").read_text()
        for route in json.loads(sh("ip", "-j", "-4", "route", "show", "default"))
    }
    daemon = start_daemon(tmp_path, ALLOW)
    pid = daemon.process.pid
    netns = network.netns_path(os.path.realpath(daemon.runtime_dir), pid)
    try:
        assert f"{network.LINK_PREFIX}{pid}h" in sh("ip", "-br", "link")
        assert f"{network.TABLE_PREFIX}{pid}" in sh("nft", "list", "tables")
        assert os.path.exists(netns)
    finally:
        stop_daemon(daemon)
    assert daemon.process.returncode == 0, daemon.log_path.read_text()
    assert f"{network.LINK_PREFIX}{pid}h" not in sh("ip", "-br", "link")
    assert f"{network.TABLE_PREFIX}{pid}" not in sh("nft", "list", "tables")
    assert not os.path.exists(netns)
    assert netns not in Path("/proc/self/mountinfo").read_text()
    assert Path("/proc/sys/net/ipv4/conf/all/forwarding").read_text() == forwarding
    for name, value in uplinks.items():
        assert Path(f"/proc/sys/net/ipv4/conf/{name}/forwarding").read_text() == value


def test_a_daemon_killed_without_cleanup_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    first = start_daemon(tmp_path / "first", ALLOW)
    first.process.kill()
    first.process.wait()
    pid = first.process.pid
    assert f"{network.TABLE_PREFIX}{pid}" in sh("nft", "list", "tables")
    second = start_daemon(tmp_path / "second", ALLOW)
    try:
        assert f"{network.TABLE_PREFIX}{pid}" not in sh("nft", "list", "tables")
        assert f"{network.LINK_PREFIX}{pid}h" not in sh("ip", "-br", "link")
    finally:
        stop_daemon(second)
        network.teardown_egress(pid, first.runtime_dir)  # its namespace file
    assert not os.path.exists(network.netns_path(os.path.realpath(first.runtime_dir), pid))


@pytest.mark.parametrize("uplinks", [(), ("eth0", "wlan0")])
def test_the_kernel_accepts_the_host_rules(uplinks: tuple[str, ...]) -> None:
    plan = network.Plan(os.getpid(), network.pick_link(os.getpid(), set()), "/run/sandboxd")
    subprocess.run(
        ["nft", "--check", "-f", "-"],
        input=network.host_rules(plan, uplinks),
        text=True,
        check=True,
    )


def test_the_kernel_accepts_the_namespace_rules() -> None:
    subprocess.run(
        ["nft", "--check", "-f", "-"], input=network.NAMESPACE_RULES, text=True, check=True
    )
