"""[network] proxy: runs with network go through a real squid and reach nothing else.

squid listens on the host's loopback (the hard case: the run's own 127.0.0.1 is its
namespace's); its hosts_file maps the test domains to this machine, where a test
server listens on every address.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration import squid
from tests.integration.conftest import Daemon, free_port, start_daemon, stop_daemon
from tests.integration.test_http_daemon import dify_outcome, dify_run

ALLOWED = "allowed.sandboxd.test"
DENIED = "denied.sandboxd.test"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"REACHED {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Setup:
    daemon: Daemon
    squid: squid.Squid
    server_port: int
    host_ip: str


def _host_ip() -> str:
    """This machine's own address on its default route (the test server listens there too)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "route", "get", "192.0.2.1"], capture_output=True, text=True, check=True
    ).stdout
    return str(json.loads(out)[0]["prefsrc"])


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory, python_deps_state: str) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("proxy")
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = squid.start(free_port(), [ALLOWED], {ALLOWED: "127.0.0.1", DENIED: "127.0.0.1"})
    try:
        daemon = start_daemon(
            base / "daemon",
            "[python3]\npool_size = 2\n[nodejs]\npool_size = 1\n"
            f'[network]\nmode = "allow"\nproxy = "{proxy.url}"\n',
            state_dir=python_deps_state,
        )
        try:
            yield Setup(daemon, proxy, server.server_address[1], _host_ip())
        finally:
            stop_daemon(daemon)
    finally:
        proxy.stop()
        server.shutdown()
        server.server_close()
        thread.join()


def _ok(answer: dict[str, Any]) -> str:
    assert answer["status"] == "ok", (answer["status"], answer["stderr"][-2000:])
    return str(answer["stdout"])


def _net(setup: Setup, code: str, language: str = "python3") -> str:
    return _ok(setup.daemon.run(code, language, enable_network=True, timeout=30))


ENV_PY = f"import os; print([os.environ.get(n) for n in {PROXY_VARIABLES!r}])"
ENV_JS = f"console.log(JSON.stringify({list(PROXY_VARIABLES)!r}.map(n => process.env[n] ?? null)))"


def test_runs_with_network_get_the_proxy_in_both_spellings(proxied: Setup) -> None:
    python = json.loads(_net(proxied, ENV_PY).replace("'", '"').replace("None", "null"))
    node = json.loads(_net(proxied, ENV_JS.replace("'", '"'), "nodejs"))
    assert python == node
    assert len(set(python)) == 1 and python[0].startswith("http://169.254.")  # the link's host end
    offline = _ok(proxied.daemon.run(ENV_PY))
    assert offline == "[None, None, None, None]\n"


# requests and httpx share the calls used here.
PY_CLIENT = (
    "client = __import__(MODULE)\n"
    "r = client.get(URL, timeout=20)\n"
    "print(r.status_code, r.headers.get('X-Squid-Error') or r.text)\n"
)


@pytest.mark.parametrize("module", ["requests", "httpx"])
def test_python_clients_reach_an_allowed_domain_through_squid(proxied: Setup, module: str) -> None:
    url = f"http://{ALLOWED}:{proxied.server_port}/py-{module}"
    code = f"URL, MODULE = {url!r}, {module!r}\n{PY_CLIENT}"
    assert _net(proxied, code) == f"200 REACHED /py-{module}\n"
    assert f"{ALLOWED}:{proxied.server_port}/py-{module}" in proxied.squid.log()  # via squid


@pytest.mark.parametrize("module", ["requests", "httpx"])
def test_python_clients_get_squids_403_for_another_domain(proxied: Setup, module: str) -> None:
    url = f"http://{DENIED}:{proxied.server_port}/py"
    code = f"URL, MODULE = {url!r}, {module!r}\n{PY_CLIENT}"
    assert _net(proxied, code).startswith("403 ERR_ACCESS_DENIED")


NODE_HTTP = (
    "require('http').get(URL, (r) => { let b = ''; r.on('data', (c) => b += c);"
    " r.on('end', () => console.log(r.statusCode, r.headers['x-squid-error'] || b)); })"
)
NODE_FETCH = (
    "fetch(URL).then(async (r) =>"
    " console.log(r.status, r.headers.get('x-squid-error') || await r.text()))"
)


@pytest.mark.parametrize("client", [NODE_HTTP, NODE_FETCH], ids=["http", "fetch"])
def test_node_clients_behave_the_same(proxied: Setup, client: str) -> None:
    allowed = f"http://{ALLOWED}:{proxied.server_port}/js"
    denied = f"http://{DENIED}:{proxied.server_port}/js"
    assert _net(proxied, f"const URL = {allowed!r}\n{client}", "nodejs") == "200 REACHED /js\n"
    assert _net(proxied, f"const URL = {denied!r}\n{client}", "nodejs").startswith(
        "403 ERR_ACCESS_DENIED"
    )


def test_the_dify_route_reaches_an_allowed_domain(proxied: Setup) -> None:
    url = f"http://{ALLOWED}:{proxied.server_port}/dify"
    code = f"import requests\nprint(requests.get({url!r}, timeout=20).text)"
    assert dify_outcome(dify_run(proxied.daemon, code)) == "REACHED /dify\n"


def test_a_connection_that_bypasses_the_proxy_fails(proxied: Setup) -> None:
    daemon_port = int(proxied.daemon.http_url.rpartition(":")[2])
    code = (
        "import os, socket, urllib.parse\n"
        "link = urllib.parse.urlsplit(os.environ['HTTP_PROXY']).hostname\n"
        f"host, server, daemon = {proxied.host_ip!r}, {proxied.server_port}, {daemon_port}\n"
        "targets = [('127.0.0.1', server), (link, server), (link, daemon), (link, 22),\n"
        "           (host, server), (host, daemon), ('192.0.2.1', 80), ('1.1.1.1', 443)]\n"
        "for host, port in targets:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=3).close()\n"
        "        print('MARKER', host, port)\n"
        "    except OSError as error:\n"
        "        print('refused', host, port, type(error).__name__)\n"
        "import requests\n"
        "session = requests.Session(); session.trust_env = False  # no proxy\n"
        "try:\n"
        f"    session.get('http://{proxied.host_ip}:{proxied.server_port}/', timeout=3)\n"
        "    print('MARKER direct requests')\n"
        "except requests.RequestException:\n"
        "    print('refused requests')\n"
    )
    out = _net(proxied, code)
    assert "MARKER" not in out, out
    assert out.count("refused") == 9, out
    node = (
        f"const s = require('net').connect({proxied.server_port}, {proxied.host_ip!r});"
        " s.on('connect', () => { console.log('MARKER'); s.destroy(); });"
        " s.on('error', (e) => console.log('refused', e.code));"
    )
    assert _net(proxied, node, "nodejs").startswith("refused"), "node reached the host directly"
    proxied.daemon.assert_healthy()


def test_the_shipped_squid_sample_parses_cleanly() -> None:
    sample = Path(__file__).parents[2] / "etc" / "squid" / "sandboxd.conf"
    done = subprocess.run(
        [squid.SQUID, "-k", "parse", "-f", str(sample)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert re.findall(r".*(?:WARNING|ERROR|FATAL).*", done.stderr) == []
