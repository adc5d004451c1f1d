"""[network] proxy: URL parsing, config errors, the nft rules and the runs' variables."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from sandboxd.config import ConfigError, load_config
from sandboxd.jail.network import (
    Plan,
    Proxy,
    _proxy_in_force,
    host_rules,
    parse_proxy,
    proxy_environment,
    proxy_url_for_runs,
)

LINK = ipaddress.IPv4Network("169.254.248.4/30")
HOST_END = ipaddress.IPv4Address("169.254.248.5")


def plan(proxy: Proxy) -> Plan:
    return Plan(4242, LINK, "/run/sandboxd", proxy)


ON_HOST = Proxy("http", ipaddress.IPv4Address("127.0.0.1"), 3128, on_host=True)
REMOTE = Proxy("http", ipaddress.IPv4Address("172.18.0.5"), 3128, on_host=False)


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("http://127.0.0.1:3128", ("http", "127.0.0.1", 3128)),
        ("http://ssrf_proxy:3128/", ("http", "ssrf_proxy", 3128)),
        ("http://squid", ("http", "squid", 3128)),
        ("socks5://10.0.0.1", ("socks5", "10.0.0.1", 1080)),
        ("SOCKS5H://proxy:9050", ("socks5h", "proxy", 9050)),
    ],
)
def test_proxy_urls_parse(url: str, parsed: tuple[str, str, int]) -> None:
    assert parse_proxy(url) == parsed


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://proxy:21", "scheme must be one of"),
        ("127.0.0.1:3128", "scheme must be one of"),
        ("http://user:pw@proxy:3128", "credentials"),
        ("http://proxy:3128/path", "nothing more"),
        ("http://proxy:99999", "out of range"),
        ("http://:3128", "no host"),
    ],
)
def test_bad_proxy_urls_say_why(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_proxy(url)


def test_a_bad_proxy_is_a_config_error_naming_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "sandboxd.toml"
    path.write_text('[network]\nmode = "allow"\nproxy = "ftp://x"\n')
    with pytest.raises(ConfigError, match=rf"^network.proxy \({path}:3\): 'ftp://x': the scheme"):
        load_config(str(path), {})


def test_dify_proxy_variables_set_the_proxy() -> None:
    url = "http://ssrf_proxy:3128"
    environ = {"HTTP_PROXY": url, "HTTPS_PROXY": url}
    assert load_config("/dev/null", environ).network.proxy == url
    socks = load_config("/dev/null", {**environ, "SOCKS5_PROXY": "10.0.0.1:1080"})
    assert socks.network.proxy == "socks5://10.0.0.1:1080"
    with pytest.raises(ConfigError, match="environment variable HTTPS_PROXY"):
        load_config("/dev/null", {"HTTPS_PROXY": "squid:3128"})


def test_a_proxy_on_the_host_is_reached_by_dnat_and_nothing_else() -> None:
    rules = host_rules(plan(ON_HOST), ())
    dnat = 'iifname "sbxe4242h" ip daddr 169.254.248.5 tcp dport 3128 dnat ip to 127.0.0.1:3128'
    assert dnat in rules
    accept = 'iifname "sbxe4242h" ip daddr 127.0.0.1 tcp dport 3128 ct status dnat accept'
    assert rules.index(accept) < rules.index('iifname "sbxe4242h" meta l4proto tcp reject')
    forward = rules[rules.index("chain forward") :]
    reject_all = 'iifname "sbxe4242h" reject with icmpx type admin-prohibited'
    assert forward.index(reject_all) < forward.index("ct status dnat reject")
    assert proxy_url_for_runs(ON_HOST, HOST_END) == "http://169.254.248.5:3128"


def test_a_remote_proxy_is_the_only_destination_forwarded() -> None:
    rules = host_rules(plan(REMOTE), ())
    forward = rules[rules.index("chain forward") :]
    for line in (
        'iifname "sbxe4242h" ip daddr != 172.18.0.5 reject',
        'iifname "sbxe4242h" meta l4proto != tcp reject',
        'iifname "sbxe4242h" tcp dport != 3128 reject',
    ):
        assert line in forward
    assert "dnat ip to" not in rules
    assert proxy_url_for_runs(REMOTE, HOST_END) == "http://172.18.0.5:3128"


def test_a_reload_sees_whether_the_proxy_changed() -> None:
    rules = host_rules(plan(ON_HOST), ())
    assert _proxy_in_force(rules, ON_HOST)
    assert not _proxy_in_force(rules, REMOTE)
    assert not _proxy_in_force(rules, None)
    assert _proxy_in_force(host_rules(Plan(4242, LINK, "/run/sandboxd"), ()), None)


def test_runs_get_both_spellings_and_socks_also_all_proxy() -> None:
    assert proxy_environment("http://169.254.248.5:3128") == {
        name: "http://169.254.248.5:3128"
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy")
    }
    socks = proxy_environment("socks5://172.18.0.5:1080")
    assert socks["ALL_PROXY"] == socks["all_proxy"] == socks["HTTPS_PROXY"]
