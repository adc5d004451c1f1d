"""Egress for runs that asked for network ([network] mode = "allow"): one network
namespace per daemon, shared by its network workers, routed and NATed by the host.

Layout (pid = the daemon's pid, so leftovers of a dead daemon can be found):

  host netns                                     egress netns (<runtime_dir>/egress-<pid>.net)
  sbxe<pid>h  169.254.x.1/30  ══ veth ══════════  eth0  169.254.x.2/30, default via .1
  nft table inet sandboxd-egress-<pid>:           lo up; nft table inet sandboxd:
    input   from sbxe<pid>h: rejected (the host's    input: only replies, and nothing
            own addresses, any port, any service)      from lo (no run hears another,
    forward from sbxe<pid>h: BLOCKED destinations,     not even by UDP hole punching)
            DNAT'd flows, IPv6 and spoofed sources     output: no IPv6
            rejected; to it: replies only
    postrouting: masquerade of the namespace address

The link is a /30 of link-local space (LINK_POOL): link-local addresses are never
routed, so they cannot shadow a destination a run wants, and blocking 169.254.0.0/16
keeps runs off both the cloud metadata services and every other daemon's link.
This module decides IP reach; runs with network get no named Unix socket and no
bind or listen (jail/seccomp.py, EGRESS_SOCKET_RULES), as they share this namespace.

Forwarding is enabled per interface, never globally: on the veth (so the namespace's
packets may be forwarded) and on the uplinks of the default routes (so their replies
may). An uplink that did not forward before gets a guard in the table (forwarded
packets entering on it must be replies) and is recorded in the table's comment, so
that the last teardown puts its forwarding back.

With [network] proxy the table narrows egress to the proxy alone (proxy_rules):
a proxy on the host (squid on 127.0.0.1) is reached through a DNAT of the link's
host end, port P, to it (route_localnet on that one link), input accepts exactly
that flow and nothing is forwarded; a proxy elsewhere is the only destination
forwarded. Runs get the proxy's URL as they must dial it (proxy_environment).
This assumes every run with network lives in this namespace and reaches the
outside only through the veth: the rules are on the host side of that link.

The namespace file lives in the runtime dir, not /run/netns: under systemd's
ProtectSystem=strict only the runtime dir is writable, and the namespace then dies
with the service's mount namespace even if the daemon is killed.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import urllib.parse
from dataclasses import dataclass

from sandboxd.jail import libc
from sandboxd.jail.liveness import daemon_alive

# /30 links are carved from here; the host side takes .1 and the namespace .2.
LINK_POOL = ipaddress.IPv4Network("169.254.248.0/22")
# Destinations a run with egress never reaches, with why (the host's own addresses
# are refused wholesale by the input chain).
BLOCKED: tuple[tuple[str, str], ...] = (
    ("169.254.0.0/16", "link-local: cloud metadata services, other daemons' egress links"),
    ("127.0.0.0/8", "loopback"),
    ("0.0.0.0/8", "'this' network"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "limited broadcast"),
)
TABLE_PREFIX = "sandboxd-egress-"
LINK_PREFIX = "sbxe"  # + pid + "h": at most 12 of IFNAMSIZ-1 = 15 characters
NETNS_PREFIX = "egress-"
NETNS_SUFFIX = ".net"
# Table comment listing the uplinks whose forwarding this daemon turned on.
FORWARDING_MARK = "forwarding-enabled:"
# Where the host tools are, whatever PATH the daemon got.
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PACKAGES = {"ip": "iproute2", "nft": "nftables", "unshare": "util-linux", "nsenter": "util-linux"}
COMMAND_TIMEOUT = 30.0


class EgressError(Exception):
    """The egress network could not be built or removed; the message says which step."""


# --- The plan: names, addresses and rule text as pure functions ---------------------------


@dataclass(frozen=True)
class Proxy:
    """[network] proxy, resolved once: the only address:port runs with network reach."""

    scheme: str  # "http", "socks5" or "socks5h"
    address: ipaddress.IPv4Address
    port: int
    # The address is the host's own (squid on 127.0.0.1 or on a host address): runs
    # reach it through a DNAT of the link's host end, never by routing to the host.
    on_host: bool


@dataclass(frozen=True)
class Plan:
    pid: int
    link: ipaddress.IPv4Network  # a /30 of LINK_POOL
    runtime_dir: str
    proxy: Proxy | None = None

    @property
    def table(self) -> str:
        return f"{TABLE_PREFIX}{self.pid}"

    @property
    def host_if(self) -> str:
        return f"{LINK_PREFIX}{self.pid}h"

    @property
    def peer_if(self) -> str:
        """The namespace end while it is created; renamed eth0 inside."""
        return f"{LINK_PREFIX}{self.pid}n"

    @property
    def netns_path(self) -> str:
        return netns_path(self.runtime_dir, self.pid)

    @property
    def host_address(self) -> ipaddress.IPv4Address:
        return self.link.network_address + 1

    @property
    def ns_address(self) -> ipaddress.IPv4Address:
        return self.link.network_address + 2


def netns_path(runtime_dir: str, pid: int) -> str:
    return os.path.join(runtime_dir, f"{NETNS_PREFIX}{pid}{NETNS_SUFFIX}")


def pick_link(pid: int, used: set[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A free /30 of LINK_POOL, probing from one derived from the pid (so daemons that
    start at the same moment rarely try the same one)."""
    links = list(LINK_POOL.subnets(new_prefix=30))
    for step in range(len(links)):
        link = links[(pid + step) % len(links)]
        if link not in used:
            return link
    raise EgressError(f"all {len(links)} egress links of {LINK_POOL} are in use")


def _names(names: tuple[str, ...]) -> str:
    return "{ " + ", ".join(f'"{name}"' for name in names) + " }"


def host_rules(plan: Plan, guarded_uplinks: tuple[str, ...]) -> str:
    """The host's nft table for this daemon (one `nft delete table` removes it)."""
    veth = f'"{plan.host_if}"'
    blocked = ", ".join(net for net, _ in BLOCKED)
    comment = FORWARDING_MARK + ",".join(guarded_uplinks)
    guard = (
        f"        iifname {_names(guarded_uplinks)} ct state != {{ established, related }} drop\n"
        if guarded_uplinks
        else ""
    )
    proxy_input, proxy_forward, proxy_nat = proxy_rules(plan)
    return (
        f"table inet {plan.table} {{\n"
        f'    comment "{comment}"\n'
        "    chain input {\n"
        "        type filter hook input priority filter - 10; policy accept;\n"
        f"{proxy_input}"
        f"        iifname {veth} meta l4proto tcp reject with tcp reset\n"
        f"        iifname {veth} reject with icmpx type admin-prohibited\n"
        "    }\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter - 10; policy accept;\n"
        f"        iifname {veth} meta nfproto ipv6 drop\n"
        f"        iifname {veth} ip saddr != {plan.ns_address} drop\n"
        f"{proxy_forward}"
        f"        iifname {veth} ip daddr {{ {blocked} }} reject with icmpx type admin-prohibited\n"
        # A DNAT on the host (published container ports...) leads to a host service.
        f"        iifname {veth} ct status dnat reject with icmpx type admin-prohibited\n"
        f"        oifname {veth} ct state {{ established, related }} accept\n"
        f"        oifname {veth} drop\n"
        f"{guard}"
        "    }\n"
        "    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f"        ip saddr {plan.ns_address} oifname != {veth} masquerade\n"
        "    }\n"
        f"{proxy_nat}"
        "}\n"
    )


# --- Proxy egress: [network] proxy makes the proxy the only reachable address:port ---------

PROXY_SCHEMES = {"http": 3128, "socks5": 1080, "socks5h": 1080}  # scheme -> default port
# Marks the proxy's rules in the table, so a reload sees whether the proxy changed.
PROXY_MARK = "sandboxd-proxy"


def parse_proxy(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a proxy URL such as http://127.0.0.1:3128; ValueError if bad."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in PROXY_SCHEMES:
        raise ValueError(f"{url!r}: the scheme must be one of {', '.join(PROXY_SCHEMES)}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: credentials in the proxy URL are not supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a proxy URL is scheme://host:port, nothing more")
    try:
        port = parts.port or PROXY_SCHEMES[scheme]
    except ValueError as error:
        raise ValueError(f"{url!r}: {error}") from None
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    return scheme, parts.hostname, port


def _is_host_address(address: ipaddress.IPv4Address) -> bool:
    """Whether the host itself has this address (binding to it succeeds only then)."""
    if address.is_loopback:
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def resolve_proxy(url: str) -> Proxy:
    """The proxy of a [network] proxy URL, its host resolved to one IPv4 address now
    (runs have no DNS of their own to reach it by name). EgressError if impossible."""
    try:
        scheme, host, port = parse_proxy(url)
        found = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except (ValueError, OSError) as error:
        raise EgressError(f"[network] proxy {url!r}: {error}") from error
    address = ipaddress.IPv4Address(found[0][4][0])
    on_host = _is_host_address(address)
    blocked = [net for net, _ in BLOCKED if address in ipaddress.IPv4Network(net)]
    if blocked and not on_host:
        raise EgressError(f"[network] proxy {url!r}: {address} is in blocked {blocked[0]}")
    return Proxy(scheme, address, port, on_host)


def proxy_rules(plan: Plan) -> tuple[str, str, str]:
    """The proxy's lines of the host table: (input rules, forward rules, nat chain).

    On the host (squid on loopback): the link's host end, port P, is DNAT'd to the
    proxy, and input accepts exactly that flow; nothing is forwarded at all.
    Elsewhere: forwarding only to the proxy's address and port.
    """
    proxy = plan.proxy
    if proxy is None:
        return "", "", ""
    veth = f'"{plan.host_if}"'
    mark = f'comment "{PROXY_MARK} {proxy.address}:{proxy.port}"'
    refuse = "reject with icmpx type admin-prohibited"
    if proxy.on_host:
        accept = (
            f"        iifname {veth} ip daddr {proxy.address} tcp dport {proxy.port}"
            f" ct status dnat accept {mark}\n"
        )
        nat = (
            "    chain proxy {\n"
            "        type nat hook prerouting priority dstnat; policy accept;\n"
            f"        iifname {veth} ip daddr {plan.host_address} tcp dport {proxy.port}"
            f" dnat ip to {proxy.address}:{proxy.port}\n"
            "    }\n"
        )
        return accept, f"        iifname {veth} {refuse}\n", nat
    forward = (
        f"        iifname {veth} ip daddr != {proxy.address} {refuse} {mark}\n"
        f"        iifname {veth} meta l4proto != tcp {refuse}\n"
        f"        iifname {veth} tcp dport != {proxy.port} {refuse}\n"
    )
    return "", forward, ""


def proxy_url_for_runs(proxy: Proxy, host_address: ipaddress.IPv4Address) -> str:
    """The proxy URL as a run must dial it: the link's host end for a proxy on the host
    (the run's own 127.0.0.1 is its namespace's loopback), else the proxy's address."""
    address = host_address if proxy.on_host else proxy.address
    return f"{proxy.scheme}://{address}:{proxy.port}"


def proxy_environment(url: str) -> dict[str, str]:
    """The variables a run with network gets: both spellings, as clients read either."""
    names = ["HTTP_PROXY", "HTTPS_PROXY"]
    if not url.startswith("http://"):
        names.append("ALL_PROXY")  # socks5: what curl, httpx and PySocks read
    return {spelling: url for name in names for spelling in (name, name.lower())}


def egress_host_address(pid: int) -> ipaddress.IPv4Address:
    """The host end's address of daemon `pid`'s egress link (it must exist)."""
    for link in json.loads(_run("ip", "-j", "-4", "addr", "show", "dev", f"{LINK_PREFIX}{pid}h")):
        for info in link.get("addr_info", []):
            return ipaddress.IPv4Address(info["local"])
    raise EgressError(f"the egress link {LINK_PREFIX}{pid}h has no IPv4 address")


def _proxy_in_force(table_text: str, proxy: Proxy | None) -> bool:
    """Whether a table's proxy rules are those of `proxy` (none for None)."""
    marks = re.findall(rf'comment "{PROXY_MARK} ([^"]*)"', table_text)
    return marks == ([f"{proxy.address}:{proxy.port}"] if proxy else [])


# Inside the egress namespace: replies only, IPv4 only. On lo not even replies: every
# run with network shares this namespace, and two runs that each send UDP to the
# other's port over lo would otherwise make the later packet a reply of the earlier
# (hole punching: conntrack sees it as established). What is related still comes in
# on lo: the resets and ICMP errors of these very rejects, which a connect waits for.
NAMESPACE_RULES = """\
table inet sandboxd {
    chain input {
        type filter hook input priority filter; policy drop;
        iifname "lo" ct state established meta l4proto tcp reject with tcp reset
        iifname "lo" ct state established reject with icmpx type admin-prohibited
        ct state { established, related } accept
        meta l4proto tcp reject with tcp reset
        reject with icmpx type admin-prohibited
    }
    chain output {
        type filter hook output priority filter; policy accept;
        meta nfproto ipv6 reject with icmpx type admin-prohibited
    }
}
"""


def guarded_uplinks_of(table_text: str) -> tuple[str, ...]:
    """The uplinks a table's comment says its daemon turned forwarding on for."""
    found = re.search(rf'comment "{FORWARDING_MARK}([^"]*)"', table_text)
    return tuple(name for name in found[1].split(",") if name) if found else ()


def pid_of(name: str, prefix: str, suffix: str = "") -> int | None:
    """The daemon pid embedded in one of our names, None for a name that is not ours."""
    found = re.fullmatch(re.escape(prefix) + r"([0-9]+)" + re.escape(suffix), name)
    return int(found[1]) if found else None


def nameservers_conf(*texts: str) -> bytes:
    """A resolv.conf for the jail from the first text with usable nameservers:
    IPv4 (egress is IPv4 only) and not loopback (127.0.0.53 and friends are the
    host's own, unreachable from the namespace). Empty when none is usable."""
    for text in texts:
        servers: list[str] = []
        for line in text.splitlines():
            words = line.split()
            if len(words) < 2 or words[0] != "nameserver":
                continue
            try:
                address = ipaddress.ip_address(words[1])
            except ValueError:
                continue
            if address.version == 4 and not address.is_loopback and not address.is_unspecified:
                servers.append(str(address))
        if servers:
            return "".join(f"nameserver {server}\n" for server in servers).encode()
    return b""


# --- Doing it -------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name, path=TOOL_PATH)
    if path is None:
        raise EgressError(f"{name} not found: install the {PACKAGES[name]} package")
    return path


def _run(*argv: str, stdin: str | None = None, netns: str | None = None) -> str:
    command = [_tool(argv[0]), *argv[1:]]
    if netns is not None:
        command = [_tool("nsenter"), f"--net={netns}", "--", *command]
    try:
        done = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise EgressError(f"{' '.join(argv)}: {error}") from error
    if done.returncode != 0:
        raise EgressError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _forwarding_file(interface: str) -> str:
    return f"/proc/sys/net/ipv4/conf/{interface}/forwarding"


def _forwarding(interface: str) -> bool:
    with open(_forwarding_file(interface)) as file:
        return file.read().strip() == "1"


def _set_forwarding(interface: str, on: bool) -> None:
    _set_sysctl(_forwarding_file(interface), on)


def _set_sysctl(path: str, on: bool) -> None:
    try:
        with open(path, "w") as file:
            file.write("1" if on else "0")
    except OSError as error:
        hint = ""
        if error.errno == errno.EROFS:  # systemd's ProtectKernelTunables=
            hint = " (the service needs ReadWritePaths=/proc/sys/net/ipv4/conf)"
        raise EgressError(f"cannot set {path}: {error}{hint}") from error


def used_links() -> set[ipaddress.IPv4Network]:
    used: set[ipaddress.IPv4Network] = set()
    for link in json.loads(_run("ip", "-j", "-4", "addr", "show") or "[]"):
        for info in link.get("addr_info", []):
            network = ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
            if network.subnet_of(LINK_POOL):
                used.add(network)
    return used


def _default_uplinks() -> tuple[str, ...]:
    names: list[str] = []
    for route in json.loads(_run("ip", "-j", "-4", "route", "show", "default") or "[]"):
        hops = route.get("nexthops") or [route]
        names.extend(hop["dev"] for hop in hops if "dev" in hop)
    if not names:
        raise EgressError("the host has no IPv4 default route to give runs egress through")
    return tuple(dict.fromkeys(names))


def _tables() -> dict[str, str]:
    """Our nft tables (any daemon's), name -> its rules as text."""
    if shutil.which("nft", path=TOOL_PATH) is None:
        return {}
    listing = json.loads(_run("nft", "-j", "list", "tables"))["nftables"]
    names = [
        item["table"]["name"]
        for item in listing
        if "table" in item
        and item["table"]["family"] == "inet"
        and item["table"]["name"].startswith(TABLE_PREFIX)
    ]
    return {name: _run("nft", "list", "table", "inet", name) for name in names}


def _link_exists(interface: str) -> bool:
    return os.path.exists(f"/sys/class/net/{interface}")


def _is_mount_point(path: str) -> bool:
    with open("/proc/self/mountinfo") as file:
        return any(line.split()[4] == path for line in file)


def setup_egress(pid: int, runtime_dir: str, proxy: Proxy | None = None) -> str:
    """Build (or find, on reload) the egress namespace of the daemon `pid`; its path.

    With a proxy, the namespace reaches that address:port only. Leftovers of
    daemons that are gone are removed first. Any failure removes what was built and
    raises EgressError: a daemon in "allow" mode must not start then.
    """
    path = netns_path(os.path.realpath(runtime_dir), pid)
    table = _tables().get(f"{TABLE_PREFIX}{pid}")
    if (
        _is_mount_point(path)
        and _link_exists(f"{LINK_PREFIX}{pid}h")
        and table is not None
        and _proxy_in_force(table, proxy)
    ):
        return path
    cleanup_stale(runtime_dir)
    teardown_egress(pid, runtime_dir)
    try:
        plan = Plan(pid, pick_link(pid, used_links()), os.path.realpath(runtime_dir), proxy)
        _build(plan)
    except (EgressError, OSError) as error:
        try:
            teardown_egress(pid, runtime_dir)
        except EgressError as cleanup:
            error.add_note(f"and removing what was built failed: {cleanup}")
        if isinstance(error, EgressError):
            raise
        raise EgressError(f"egress network: {error}") from error
    return path


def setup_proxied_egress(pid: int, runtime_dir: str, proxy_url: str) -> tuple[str, dict[str, str]]:
    """setup_egress() for [network] proxy (none when ""): the namespace path, and the
    environment variables that point runs at the proxy."""
    if not proxy_url:
        return setup_egress(pid, runtime_dir), {}
    proxy = resolve_proxy(proxy_url)
    path = setup_egress(pid, runtime_dir, proxy)
    return path, proxy_environment(proxy_url_for_runs(proxy, egress_host_address(pid)))


def _build(plan: Plan) -> None:
    os.makedirs(plan.runtime_dir, mode=0o755, exist_ok=True)
    with open(plan.netns_path, "w"):
        pass  # the mount point of the namespace
    _run("unshare", f"--net={plan.netns_path}", "true")
    host, ns = plan.host_if, plan.peer_if
    _run("ip", "link", "add", host, "type", "veth", "peer", "name", ns, "netns", plan.netns_path)
    _run("ip", "link", "set", host, "addrgenmode", "none")
    _run("ip", "addr", "add", f"{plan.host_address}/30", "dev", host)
    _run("ip", "link", "set", host, "up")
    inside = plan.netns_path
    _run("nft", "-f", "-", stdin=NAMESPACE_RULES, netns=inside)
    _run("ip", "link", "set", ns, "name", "eth0", netns=inside)
    _run("ip", "link", "set", "eth0", "addrgenmode", "none", netns=inside)
    _run("ip", "addr", "add", f"{plan.ns_address}/30", "dev", "eth0", netns=inside)
    _run("ip", "link", "set", "lo", "up", netns=inside)
    _run("ip", "link", "set", "eth0", "up", netns=inside)
    _run("ip", "route", "add", "default", "via", str(plan.host_address), netns=inside)
    # Uplinks already forwarding because of another daemon stay guarded by us too, so
    # that whichever daemon stops last turns their forwarding off.
    others = {name for text in _tables().values() for name in guarded_uplinks_of(text)}
    guarded = tuple(name for name in _default_uplinks() if name in others or not _forwarding(name))
    # The table (with its guards) exists before any forwarding is turned on.
    _run("nft", "-f", "-", stdin=host_rules(plan, guarded))
    if plan.proxy is not None and plan.proxy.on_host:
        # The DNAT to the host's loopback needs it, on this one link only.
        _set_sysctl(f"/proc/sys/net/ipv4/conf/{host}/route_localnet", True)
    _set_forwarding(host, True)
    for name in guarded:
        _set_forwarding(name, True)


def teardown_egress(pid: int, runtime_dir: str) -> None:
    """Remove the egress namespace, veth and nft table of daemon `pid`; idempotent."""
    errors: list[str] = []
    host_if = f"{LINK_PREFIX}{pid}h"
    if _link_exists(host_if):
        try:
            _run("ip", "link", "delete", host_if)  # takes the namespace end with it
        except EgressError as error:
            errors.append(str(error))
    path = netns_path(os.path.realpath(runtime_dir), pid)
    try:
        if _is_mount_point(path):
            libc.umount2(path, libc.MNT_DETACH)
        if os.path.exists(path):
            os.unlink(path)
    except OSError as error:
        errors.append(f"namespace {path}: {error}")
    try:
        _drop_table(f"{TABLE_PREFIX}{pid}")
    except EgressError as error:
        errors.append(str(error))
    if errors:
        raise EgressError("; ".join(errors))


def _drop_table(name: str) -> None:
    """Delete one daemon's table; uplinks no remaining table guards stop forwarding."""
    tables = _tables()
    if name not in tables:
        return
    mine = guarded_uplinks_of(tables.pop(name))
    _run("nft", "delete", "table", "inet", name)
    still = {uplink for text in tables.values() for uplink in guarded_uplinks_of(text)}
    for uplink in mine:
        if uplink not in still and _link_exists(uplink):
            _set_forwarding(uplink, False)


def cleanup_stale(runtime_dir: str) -> None:
    """Remove egress leftovers (links, tables, namespace files) of daemons that are gone."""
    pids: set[int] = set()
    for name in os.listdir("/sys/class/net"):
        if (pid := pid_of(name, LINK_PREFIX, "h")) is not None:
            pids.add(pid)
    for name in _tables():
        if (pid := pid_of(name, TABLE_PREFIX)) is not None:
            pids.add(pid)
    if os.path.isdir(runtime_dir):
        for name in os.listdir(runtime_dir):
            if (pid := pid_of(name, NETNS_PREFIX, NETNS_SUFFIX)) is not None:
                pids.add(pid)
    for pid in sorted(pids):
        if not daemon_alive(pid):
            teardown_egress(pid, runtime_dir)


def remove_stale_namespaces() -> list[str]:
    """Unmount and unlink egress namespace files of dead daemons in any runtime dir
    (a killed daemon's veth and table go in cleanup_stale); the paths removed."""
    removed: list[str] = []
    with open("/proc/self/mountinfo") as file:
        mount_points = [line.split()[4] for line in file]
    for path in reversed(mount_points):
        pid = pid_of(os.path.basename(path), NETNS_PREFIX, NETNS_SUFFIX)
        if pid is None or daemon_alive(pid):
            continue
        try:
            libc.umount2(path, libc.MNT_DETACH)
            os.unlink(path)
        except FileNotFoundError:
            pass
        removed.append(path)
    return removed


def resolv_conf() -> bytes:
    """The jail's /etc/resolv.conf: the host's upstream nameservers (systemd-resolved's
    list when it runs, else /etc/resolv.conf's), never a loopback stub."""
    texts: list[str] = []
    for path in ("/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"):
        try:
            with open(path) as file:
                texts.append(file.read())
        except OSError:
            continue
    return nameservers_conf(*texts)
