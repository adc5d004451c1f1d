"""The egress network's plan: addresses, names and rule text, as pure functions."""

from __future__ import annotations

import ipaddress

import pytest

from sandboxd.config import Config, NetworkConfig
from sandboxd.daemon import StartupError, build_spec
from sandboxd.jail import network
from sandboxd.jail.network import (
    BLOCKED,
    LINK_POOL,
    EgressError,
    Plan,
    guarded_uplinks_of,
    host_rules,
    nameservers_conf,
    pick_link,
    pid_of,
)

PID_MAX = 4194304  # /proc/sys/kernel/pid_max's ceiling on 64-bit


def plan(pid: int = 4242) -> Plan:
    return Plan(pid, ipaddress.IPv4Network("169.254.248.4/30"), "/run/sandboxd")


def blocked(address: str) -> bool:
    return any(ipaddress.ip_address(address) in ipaddress.ip_network(n) for n, _ in BLOCKED)


def test_the_host_side_is_the_first_address_of_the_link_and_the_namespace_the_second() -> None:
    assert str(plan().host_address) == "169.254.248.5"
    assert str(plan().ns_address) == "169.254.248.6"


def test_names_embed_the_pid_and_fit_an_interface_name() -> None:
    big = plan(PID_MAX)
    assert big.host_if == "sbxe4194304h" and big.peer_if == "sbxe4194304n"
    assert len(big.host_if) <= 15 and len(big.peer_if) <= 15  # IFNAMSIZ - 1
    assert big.table == "sandboxd-egress-4194304"
    assert big.netns_path == "/run/sandboxd/egress-4194304.net"
    assert pid_of(big.host_if, network.LINK_PREFIX, "h") == PID_MAX
    assert pid_of(big.table, network.TABLE_PREFIX) == PID_MAX
    assert pid_of("egress-4194304.net", network.NETNS_PREFIX, network.NETNS_SUFFIX) == PID_MAX


@pytest.mark.parametrize("name", ["eth0", "sbxe12x", "sbxe12hh", "sandboxd-egress-", "veth1"])
def test_names_that_are_not_ours_have_no_pid(name: str) -> None:
    assert pid_of(name, network.LINK_PREFIX, "h") is None
    assert pid_of(name, network.TABLE_PREFIX) is None


def test_links_are_slash_30s_of_the_pool_chosen_from_the_pid() -> None:
    link = pick_link(7, set())
    assert link.prefixlen == 30 and link.subnet_of(LINK_POOL)
    assert pick_link(7, set()) == link
    assert pick_link(8, set()) != link


def test_a_used_link_is_skipped() -> None:
    first = pick_link(7, set())
    second = pick_link(7, {first})
    assert second != first and second.subnet_of(LINK_POOL)


def test_a_full_pool_is_an_error() -> None:
    with pytest.raises(EgressError, match="in use"):
        pick_link(7, set(LINK_POOL.subnets(new_prefix=30)))


def test_every_egress_link_is_a_blocked_destination_but_the_internet_is_not() -> None:
    # So no run reaches another daemon's link (nor its own host side by forwarding).
    assert any(LINK_POOL.subnet_of(ipaddress.IPv4Network(net)) for net, _ in BLOCKED)
    assert blocked("169.254.169.254")  # cloud metadata
    assert blocked("127.0.0.1") and blocked("224.0.0.251") and blocked("255.255.255.255")
    assert not blocked("198.18.0.2") and not blocked("10.1.2.3") and not blocked("1.1.1.1")


def test_host_rules_refuse_the_host_and_forward_only_the_namespace_address() -> None:
    rules = host_rules(plan(), ())
    assert rules.startswith("table inet sandboxd-egress-4242 {\n")
    assert 'iifname "sbxe4242h" meta l4proto tcp reject with tcp reset' in rules
    assert 'iifname "sbxe4242h" reject with icmpx type admin-prohibited' in rules
    assert 'iifname "sbxe4242h" ip saddr != 169.254.248.6 drop' in rules
    assert 'iifname "sbxe4242h" meta nfproto ipv6 drop' in rules
    assert 'iifname "sbxe4242h" ct status dnat reject' in rules
    assert 'oifname "sbxe4242h" ct state { established, related } accept' in rules
    assert 'oifname "sbxe4242h" drop' in rules
    assert 'ip saddr 169.254.248.6 oifname != "sbxe4242h" masquerade' in rules
    for net, _ in BLOCKED:
        assert net in rules


def test_host_rules_guard_only_uplinks_whose_forwarding_was_turned_on() -> None:
    assert "ct state != { established, related } drop" not in host_rules(plan(), ())
    rules = host_rules(plan(), ("eth0", "wlan0"))
    assert 'iifname { "eth0", "wlan0" } ct state != { established, related } drop' in rules


@pytest.mark.parametrize("uplinks", [(), ("eth0",), ("eth0", "wlan0")])
def test_the_table_comment_records_the_guarded_uplinks(uplinks: tuple[str, ...]) -> None:
    assert guarded_uplinks_of(host_rules(plan(), uplinks)) == uplinks


def test_a_table_without_our_comment_guards_nothing() -> None:
    assert guarded_uplinks_of("table inet x {\n}\n") == ()


def test_namespace_rules_accept_only_replies() -> None:
    rules = network.NAMESPACE_RULES
    assert "policy drop;" in rules and "ct state { established, related } accept" in rules
    assert "meta nfproto ipv6 reject" in rules


def test_resolv_conf_keeps_upstream_ipv4_nameservers() -> None:
    text = "# generated\nsearch example.internal\nnameserver 10.0.0.53\nnameserver 10.0.0.54\n"
    assert nameservers_conf(text) == b"nameserver 10.0.0.53\nnameserver 10.0.0.54\n"


def test_resolv_conf_drops_loopback_stubs_ipv6_and_garbage() -> None:
    text = "nameserver 127.0.0.53\nnameserver ::1\nnameserver fd00::53\nnameserver x\nnameserver\n"
    assert nameservers_conf(text) == b""


def test_resolv_conf_falls_back_to_the_next_source() -> None:
    resolved = "nameserver 127.0.0.53\n"
    assert nameservers_conf(resolved, "nameserver 192.0.2.53\n") == b"nameserver 192.0.2.53\n"
    assert nameservers_conf("nameserver 192.0.2.1\n", "nameserver 192.0.2.53\n") == (
        b"nameserver 192.0.2.1\n"
    )


def test_the_daemon_refuses_allow_mode_without_an_egress_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(pid: int, runtime_dir: str) -> str:
        raise EgressError("nft not found: install the nftables package")

    monkeypatch.setattr(network, "setup_egress", fail)
    config = Config(network=NetworkConfig(mode="allow"))
    with pytest.raises(StartupError, match='mode = "allow": no egress network: nft not found'):
        build_spec(config, cgroups_in_force=False)


def test_the_daemon_builds_no_egress_network_unless_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(pid: int, runtime_dir: str) -> str:
        raise AssertionError("setup_egress called in deny mode")

    monkeypatch.setattr(network, "setup_egress", fail)
    spec, _ = build_spec(Config(network=NetworkConfig(mode="deny")), cgroups_in_force=False)
    assert spec.egress_netns is None
