"""No socket or port is shared between two runs at once (DESIGN.md invariants 6 and 15).

Every test here runs two attacker-written runs at the same time (tenants.run_together):
one offers a channel (a Unix socket by abstract name or by path, TCP and UDP ports on
0.0.0.0 and 127.0.0.1, a port to take), the other tries to use it, and whichever side
sees the other prints MARKER. Without network each run has a network namespace of its
own; with network ([network] mode = "allow", the Dify route asks for it) runs share the
egress namespace, whose nft input chain and the network seccomp policy close them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.jail import network
from tests.integration.conftest import Daemon, start_daemon, stop_daemon
from tests.integration.tenants import DIRECTION_IDS, DIRECTIONS, Tenant, run_together

WINDOW_S = 4  # how long each side offers or tries its channel
ABSTRACT = "\\0sbx-collusion"
FILE_SOCKET = "/tmp/sbx-collusion.sock"
PORT = 8080
TAKEN_PORT = 8090

# --- Unix sockets: the reproduction (an fd of "/" handed over) -----------------

UNIX_OFFER = {
    "python3": f"""
import os, socket, time
end = time.monotonic() + {WINDOW_S}
try:
    s = socket.socket(socket.AF_UNIX)
    s.bind("ADDRESS")
    s.listen(1)
    s.settimeout({WINDOW_S})
    c, _ = s.accept()
    print("MARKER accepted a connection from another run")
    socket.send_fds(c, [b"x"], [os.open("/", os.O_RDONLY)])
except OSError as error:
    print("closed:", repr(error))
time.sleep(max(0, end - time.monotonic()))
""",
    "nodejs": f"""
const net = require('net');
const server = net.createServer((c) => {{
  console.log('MARKER accepted a connection from another run'); c.destroy();
}});
server.on('error', (e) => console.log('closed:', e.code));
server.listen('ADDRESS');
setTimeout(() => server.close(), {WINDOW_S * 1000});
""",
}

UNIX_TRY = {
    "python3": f"""
import os, socket, time
end, error = time.monotonic() + {WINDOW_S}, None
while time.monotonic() < end:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect("ADDRESS")
    except OSError as caught:
        error = caught
        time.sleep(0.05)
        continue
    print("MARKER connected to another run's socket")
    _, fds, _, _ = socket.recv_fds(s, 10, 4)
    os.fchdir(fds[0])
    for _ in range(30):
        os.chdir("..")
    print("MARKER", os.listdir("."))
    break
print("closed:", repr(error))
""",
    "nodejs": f"""
const net = require('net');
const end = Date.now() + {WINDOW_S * 1000};
function attempt() {{
  const c = net.connect('ADDRESS');
  c.on('connect', () => {{
    console.log("MARKER connected to another run's socket"); c.destroy();
  }});
  c.on('error', (e) => {{
    if (Date.now() < end) setTimeout(attempt, 50); else console.log('closed:', e.code);
  }});
}}
attempt();
""",
}

# --- TCP and UDP: one side listens on 0.0.0.0:PORT and 127.0.0.1:PORT+1 ------------------

IP_OFFER = {
    "python3": f"""
import select, socket, time
socks = []
for host, port in (("0.0.0.0", {PORT}), ("127.0.0.1", {PORT + 1})):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind((host, port))
            if kind == socket.SOCK_STREAM:
                s.listen(4)
            socks.append(s)
        except OSError as error:
            print("closed:", host, port, repr(error))
end = time.monotonic() + {WINDOW_S}
while time.monotonic() < end:
    ready, _, _ = select.select(socks, [], [], 0.2)
    for s in ready:
        print("MARKER heard from another run on", s.getsockname())
        if s.type == socket.SOCK_STREAM:
            s.accept()[0].close()
        else:
            s.recvfrom(16)
""",
    "nodejs": f"""
const net = require('net'), dgram = require('dgram');
for (const [host, port] of [['0.0.0.0', {PORT}], ['127.0.0.1', {PORT + 1}]]) {{
  const server = net.createServer((c) => {{
    console.log('MARKER tcp connection from another run'); c.destroy();
  }});
  server.on('error', (e) => console.log('closed:', host, port, e.code));
  server.listen(port, host);
  const u = dgram.createSocket('udp4');
  u.on('error', (e) => console.log('closed:', host, port, e.code));
  u.on('message', () => console.log('MARKER datagram from another run'));
  u.bind(port, host);
  setTimeout(() => {{ server.close(); try {{ u.close(); }} catch (e) {{}} }}, {WINDOW_S * 1000});
}}
""",
}

IP_TRY = {
    "python3": f"""
import socket, time
end = time.monotonic() + {WINDOW_S}
while time.monotonic() < end:
    for host in TARGETS:
        for port in ({PORT}, {PORT + 1}):
            try:
                socket.create_connection((host, port), timeout=0.2).close()
                print("MARKER reached another run over tcp", host, port)
            except OSError:
                pass
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.sendto(b"x", (host, port))
            except OSError:
                pass
    time.sleep(0.1)
""",
    "nodejs": f"""
const net = require('net'), dgram = require('dgram');
const end = Date.now() + {WINDOW_S * 1000};
const u = dgram.createSocket('udp4');
u.on('error', () => {{}});
function round() {{
  for (const host of TARGETS) for (const port of [{PORT}, {PORT + 1}]) {{
    const c = net.connect({{ host, port }});
    c.on('connect', () => {{ console.log('MARKER reached another run over tcp'); c.destroy(); }});
    c.on('error', () => {{}});
    u.send('x', port, host, () => {{}});
  }}
  if (Date.now() < end) setTimeout(round, 200);
  else setTimeout(() => {{ try {{ u.close(); }} catch (e) {{}} }}, 100);
}}
round();
""",
}

# --- Taking a port: both sides bind TCP and UDP 0.0.0.0:TAKEN_PORT and hold it --------

TAKE_PORT = {
    "python3": f"""
import errno, socket, time
end, held = time.monotonic() + {WINDOW_S}, {{}}
while time.monotonic() < end:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        if kind in held:
            continue
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("0.0.0.0", {TAKEN_PORT}))
            held[kind] = s
        except OSError as error:
            s.close()
            if error.errno == errno.EADDRINUSE:
                print("MARKER another run holds the port", kind)
    time.sleep(0.1)
print("held:", sorted(int(kind) for kind in held))
""",
    "nodejs": f"""
const net = require('net'), dgram = require('dgram');
const end = Date.now() + {WINDOW_S * 1000};
const held = {{}};
const busy = {{}};
function attempt() {{
  if (!held.tcp && !busy.tcp) {{
    busy.tcp = true;
    const s = net.createServer();
    s.on('error', (e) => {{
      busy.tcp = false;
      if (e.code === 'EADDRINUSE') console.log('MARKER another run holds the port (tcp)');
    }});
    s.listen({TAKEN_PORT}, '0.0.0.0', () => {{ held.tcp = s; }});
  }}
  if (!held.udp && !busy.udp) {{
    busy.udp = true;
    const u = dgram.createSocket('udp4');
    u.on('error', (e) => {{
      busy.udp = false;
      if (e.code === 'EADDRINUSE') console.log('MARKER another run holds the port (udp)');
    }});
    u.bind({TAKEN_PORT}, '0.0.0.0', () => {{ held.udp = u; }});
  }}
  if (Date.now() < end) setTimeout(attempt, 100);
  else for (const h of Object.values(held)) h.close();
}}
attempt();
""",
}

# --- A datagram pair autobound to an abstract name (SO_PASSCRED), found by a scan -------

AUTOBIND_OFFER = f"""
import ctypes, select, socket, time
libc = ctypes.CDLL(None, use_errno=True)
unspec = ctypes.create_string_buffer(16)  # sa_family 0: AF_UNSPEC
end = time.monotonic() + {WINDOW_S}
try:
    offered = []
    for _ in range(64):  # 64 of the 2**20 names: a scan finds one in about 16,000 tries
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        libc.connect(a.fileno(), unspec, 16)  # dissolve the pair: `a` takes any sender
        a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        try:
            a.sendto(b"x", b"\\0sbx-nobody")  # autobinds `a` to five hex digits first
        except OSError:
            pass
        offered += [a, b]
    print("autobound, e.g.", offered[0].getsockname())
    while time.monotonic() < end:
        if select.select(offered, [], [], 0.2)[0]:
            print("MARKER a datagram from another run")
            break
except OSError as error:
    print("closed:", repr(error))
time.sleep(max(0, end - time.monotonic()))
"""

AUTOBIND_TRY = f"""
import socket, time
end = time.monotonic() + {WINDOW_S}
try:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = 0
    while time.monotonic() < end:  # as many of the 2**20 names as the window allows
        for name in range(name, name + 4096):
            try:
                b.sendto(b"y", b"\\0%05x" % (name % (1 << 20)))
            except OSError:
                pass
        name += 1
except OSError as error:
    print("closed:", repr(error))
time.sleep(max(0, end - time.monotonic()))
"""


def fill(code: str, address: str = "", targets: tuple[str, ...] = ("127.0.0.1",)) -> str:
    return code.replace("ADDRESS", address).replace("TARGETS", json.dumps(list(targets)))


def pair(offer: dict[str, str], attempt: dict[str, str], sender: str, receiver: str,
         **values: object) -> tuple[Tenant, Tenant]:  # fmt: skip
    return (
        Tenant(sender, fill(offer[sender], **values)),  # type: ignore[arg-type]
        Tenant(receiver, fill(attempt[receiver], **values)),  # type: ignore[arg-type]
    )


# --- Without network: every channel, every direction ------------------------------------


@pytest.mark.parametrize("address", [ABSTRACT, FILE_SOCKET], ids=["abstract", "file"])
@pytest.mark.parametrize(("sender", "receiver", "route"), DIRECTIONS, ids=DIRECTION_IDS)
def test_a_run_cannot_reach_another_runs_unix_socket(
    daemon: Daemon, sender: str, receiver: str, route: str, address: str
) -> None:
    run_together(daemon, *pair(UNIX_OFFER, UNIX_TRY, sender, receiver, address=address), route)


@pytest.mark.parametrize(("sender", "receiver", "route"), DIRECTIONS, ids=DIRECTION_IDS)
def test_a_run_cannot_reach_another_runs_tcp_or_udp_port(
    daemon: Daemon, sender: str, receiver: str, route: str
) -> None:
    run_together(daemon, *pair(IP_OFFER, IP_TRY, sender, receiver), route)


@pytest.mark.parametrize(("sender", "receiver", "route"), DIRECTIONS, ids=DIRECTION_IDS)
def test_a_run_cannot_see_a_port_another_run_took(
    daemon: Daemon, sender: str, receiver: str, route: str
) -> None:
    answers = run_together(daemon, *pair(TAKE_PORT, TAKE_PORT, sender, receiver), route)
    # Both held the same port at once: each has a namespace of its own.
    for answer in answers:
        if "held:" in answer.stdout:  # python prints what it held
            assert "held: [1, 2]" in answer.stdout, answer.raw


def test_a_run_cannot_reach_another_runs_autobound_datagram_socket(daemon: Daemon) -> None:
    run_together(daemon, Tenant("python3", AUTOBIND_OFFER), Tenant("python3", AUTOBIND_TRY))


# --- With network: the egress namespace is shared, and still no channel ----------------

ALLOW = '[network]\nmode = "allow"\n'


@pytest.fixture(scope="module")
def allow_daemon(
    tmp_path_factory: pytest.TempPathFactory, python_deps_state: str
) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("allow"), ALLOW, state_dir=python_deps_state)
    yield running
    stop_daemon(running)
    assert running.process.returncode == 0, running.log_path.read_text()


def egress_address(daemon: Daemon) -> str:
    """The egress namespace's own address: another way onto its loopback."""
    path = network.netns_path(daemon.runtime_dir, daemon.process.pid)
    assert Path(path).exists(), f"no egress namespace at {path}"
    shown = subprocess.run(
        ["nsenter", f"--net={path}", "--", "ip", "-j", "-4", "addr", "show", "eth0"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return str(json.loads(shown)[0]["addr_info"][0]["local"])


# The Dify route asks for network; on the allow daemon both runs are network runs.
NETWORK_DIRECTIONS = [d for d in DIRECTIONS if d[2] == "dify"]
NETWORK_IDS = [i for i, d in zip(DIRECTION_IDS, DIRECTIONS, strict=True) if d[2] == "dify"]


@pytest.mark.parametrize(("sender", "receiver", "route"), NETWORK_DIRECTIONS, ids=NETWORK_IDS)
def test_network_runs_cannot_reach_each_others_abstract_socket(
    allow_daemon: Daemon, sender: str, receiver: str, route: str
) -> None:
    tenants = pair(UNIX_OFFER, UNIX_TRY, sender, receiver, address=ABSTRACT)
    answers = run_together(allow_daemon, *tenants, route)
    assert all("EACCES" in a.stdout or "Permission" in a.stdout for a in answers), answers


@pytest.mark.parametrize(("sender", "receiver", "route"), NETWORK_DIRECTIONS, ids=NETWORK_IDS)
def test_network_runs_cannot_reach_each_other_over_loopback_or_the_egress_address(
    allow_daemon: Daemon, sender: str, receiver: str, route: str
) -> None:
    targets = ("127.0.0.1", egress_address(allow_daemon))
    run_together(allow_daemon, *pair(IP_OFFER, IP_TRY, sender, receiver, targets=targets), route)


@pytest.mark.parametrize(("sender", "receiver", "route"), NETWORK_DIRECTIONS, ids=NETWORK_IDS)
def test_network_runs_cannot_see_a_port_another_took(
    allow_daemon: Daemon, sender: str, receiver: str, route: str
) -> None:
    run_together(allow_daemon, *pair(TAKE_PORT, TAKE_PORT, sender, receiver), route)


def test_network_runs_cannot_reach_an_autobound_datagram_socket(allow_daemon: Daemon) -> None:
    offer, attempt = Tenant("python3", AUTOBIND_OFFER), Tenant("python3", AUTOBIND_TRY)
    answers = run_together(allow_daemon, offer, attempt, "dify")
    assert all("PermissionError" in a.stdout for a in answers), answers


# --- A refused socket is an error the code can catch, not a kill ------------------------

REFUSALS = {
    "python3": """
import socket
for label, make in (
    ("unix", lambda: socket.socket(socket.AF_UNIX)),
    ("bind", lambda: socket.socket().bind(("0.0.0.0", 0))),
    ("dgram pair", lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)),
):
    try:
        make()
        print(label, "allowed")
    except PermissionError as error:
        print(label, "refused", error.errno)
socket.socketpair()
print("stream pair works")
""",
    "nodejs": """
const net = require('net');
const server = net.createServer();
server.on('error', (e) => {
  console.log('listen refused', e.code);
  const unix = net.createServer();
  unix.on('error', (e2) => console.log('unix refused', e2.code));
  unix.listen('\\0sbx-refused');
});
server.listen(0);
""",
}


def test_refused_sockets_are_a_clean_permission_error_in_python(allow_daemon: Daemon) -> None:
    answer = allow_daemon.run(REFUSALS["python3"], enable_network=True)
    assert answer["status"] == "ok", answer
    lines = answer["stdout"].splitlines()
    assert lines == [
        "unix refused 13", "bind refused 13", "dgram pair refused 13", "stream pair works"
    ], answer  # fmt: skip


def test_refused_sockets_are_a_clean_eacces_in_node(allow_daemon: Daemon) -> None:
    answer = allow_daemon.run(REFUSALS["nodejs"], "nodejs", enable_network=True)
    assert answer["status"] == "ok", answer
    assert answer["stdout"].splitlines() == ["listen refused EACCES", "unix refused EACCES"]
