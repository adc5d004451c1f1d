"""The config loader: defaults, the TOML file, environment overrides, and errors that
name the key and where its value came from (file:line or environment variable)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
import pytest

from sandboxd import config as config_module
from sandboxd.config import (
    Config,
    ConfigError,
    default_pool_size,
    effective_pool_size,
    load_config,
    parse_listen,
    pool_sizes,
)

SHIPPED = Path(__file__).parents[2] / "etc" / "sandboxd" / "sandboxd.toml"
ALL_KEYS = {
    f"{section.name}.{field.name}"
    for section in msgspec.structs.fields(Config)
    for field in msgspec.structs.fields(section.type)
}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sandboxd.toml"
    path.write_text(text)
    return str(path)


def load_text(tmp_path: Path, text: str, **environ: str) -> Config:
    return load_config(write(tmp_path, text), environ)


def error_of(tmp_path: Path, text: str, **environ: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, **environ)
    return str(caught.value)


def uncommented(text: str) -> str:
    """The shipped file with every `# key = value` line made live."""
    return re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)


# --- Defaults and the shipped file ---


def test_missing_default_file_means_all_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    assert load_config(None, {}) == Config()


def test_environ_defaults_to_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("SANDBOXD_LIMITS_TASKS", "32")
    assert load_config().limits.tasks == 32


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=f"{re.escape(path)}: config file not found"):
        load_config(path, {})


def test_shipped_file_as_is_equals_the_defaults() -> None:
    assert load_config(str(SHIPPED), {}) == Config()


def test_shipped_file_uncommented_equals_the_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, uncommented(SHIPPED.read_text())) == Config()


def test_shipped_file_shows_every_key() -> None:
    data = tomllib.loads(uncommented(SHIPPED.read_text()))
    shown = {f"{section}.{key}" for section, keys in data.items() for key in keys}
    assert shown == ALL_KEYS


def test_file_values_are_read(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        '[limits]\nmax_workers = 8\ntimeout = 20\n[network]\nmode = "reject"\n'
        "[server]\nsocket_mode = 0o600\n",
    )
    assert config.limits.max_workers == 8
    assert config.limits.timeout == 20.0  # an int is fine where seconds are expected
    assert config.network.mode == "reject"
    assert config.server.socket_mode == 0o600


def test_pool_size_zero_means_two_per_core() -> None:
    assert effective_pool_size(0) == default_pool_size()
    assert effective_pool_size(3) == 3


# --- Errors in the file name the key and its line ---


def test_unknown_section_names_it_and_its_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[limits]\ntimeout = 5\n\n[limitz]\ntasks = 3\n")
    assert message.startswith(f"limitz ({tmp_path}/sandboxd.toml:4): unknown section")
    assert "did you mean limits?" in message


def test_unknown_key_names_it_and_its_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[http]\nlisten = 'none'\n[limits]\ntimout = 5\n")
    assert message.startswith(f"limits.timout ({tmp_path}/sandboxd.toml:4): unknown key")
    assert "did you mean timeout?" in message


def test_key_outside_any_section_is_unknown(tmp_path: Path) -> None:
    message = error_of(tmp_path, "timeout = 5\n")
    assert message.startswith(f"timeout ({tmp_path}/sandboxd.toml:1): unknown section")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('timeout = "x"', "expected `float`, got `str`"),
        ("max_workers = true", "expected `int`, got `bool`"),  # bools are not ints
        ("max_workers = 2.5", "expected `int`, got `float`"),
        ("memory_mb = 0", "expected `int` >= 1"),
        ("timeout = -1.0", "expected `float` > 0"),
        ("timeout = nan", "expected `float` > 0"),
        ("cpu_percent = -1", "expected `int` >= 0"),
        ('cgroups = "cgroupfs"', "expected one of: 'systemd', 'auto', 'off'"),
    ],
)
def test_bad_value_names_key_line_and_expectation(tmp_path: Path, line: str, expected: str) -> None:
    key = line.split(" =")[0]
    message = error_of(tmp_path, f"# limits\n[limits]\n{line}\n")
    assert message.startswith(f"limits.{key} ({tmp_path}/sandboxd.toml:3): ")
    assert expected in message


@pytest.mark.parametrize(
    ("section", "line", "expected"),
    [
        ("server", "socket_mode = 0o1777", "<= 511"),
        ("jail", "uid_min = 0", ">= 1"),  # never root
        ("jail", "hostname = ''", "length >= 1"),
        ("python3", "pool_size = -1", ">= 0"),
        ("network", 'mode = "open"', "expected one of: 'deny', 'reject', 'allow'"),
    ],
)
def test_out_of_range_value_names_key_and_line(
    tmp_path: Path, section: str, line: str, expected: str
) -> None:
    key = line.split(" =")[0]
    message = error_of(tmp_path, f"[{section}]\n\n{line}\n")
    assert message.startswith(f"{section}.{key} ({tmp_path}/sandboxd.toml:3): ")
    assert expected in message


def test_value_in_inline_table_names_the_sections_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, '\nlimits = { timeout = "x" }\n')
    assert message.startswith(f"limits.timeout ({tmp_path}/sandboxd.toml:2): expected `float`")


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[limits]\ntasks = 3\ntimeout = \n")
    assert message.startswith(f"{tmp_path}/sandboxd.toml:3: invalid TOML: ")
    assert "line 3" in message


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path), {})  # a directory


# --- Rules between keys ---


@pytest.mark.parametrize(
    ("text", "key", "other"),
    [
        ("timeout = 30.0\nmax_timeout = 20.0", "limits.max_timeout", "limits.timeout"),
        ("memory_mb = 512\nmax_memory_mb = 256", "limits.max_memory_mb", "limits.memory_mb"),
        ("max_workers = 8\nmax_requests = 4", "limits.max_requests", "limits.max_workers"),
    ],
)
def test_maximum_below_its_default_names_both_keys_and_lines(
    tmp_path: Path, text: str, key: str, other: str
) -> None:
    path = f"{tmp_path}/sandboxd.toml"
    message = error_of(tmp_path, f"[limits]\n{text}\n")
    assert message.startswith(f"{key} = ")
    assert f"({path}:3) must be >= {other}; {other} = " in message
    assert message.endswith(f"({path}:2)")


def test_uid_max_below_uid_min_is_an_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[jail]\nuid_min = 70000\nuid_max = 60000\n")
    assert message.startswith(f"jail.uid_max = 60000 ({tmp_path}/sandboxd.toml:3) must be >=")


def test_uid_pool_must_hold_every_worker_that_can_be_alive(tmp_path: Path) -> None:
    pools = (
        '[python3]\npool_size = 3\nwarm_modules = ""\n[nodejs]\npool_size = 2\n'
        "[limits]\nmax_workers = 4\n"
    )
    # Two generations of 3 + 2 during a reload, + 4 running = 14: 14 uids are enough.
    assert load_text(tmp_path, pools + "[jail]\nuid_min = 100\nuid_max = 113\n")
    message = error_of(tmp_path, pools + "[jail]\nuid_min = 100\nuid_max = 112\n")
    assert message.startswith(f"jail.uid_max = 112 ({tmp_path}/sandboxd.toml:10) must be >=")
    assert "14 workers" in message


def test_uid_pool_counts_the_network_and_data_science_pools(tmp_path: Path) -> None:
    pools = (
        "[python3]\npool_size = 4\n[nodejs]\npool_size = 2\n[limits]\nmax_workers = 4\n"
        '[network]\nmode = "allow"\n'
    )
    # Plain 4 + 2, network 2 + 1, data science 2 + 1 (python3 only): 12 a generation.
    plan = pool_sizes(load_text(tmp_path, pools), ("python3", "science", "nodejs"), True)
    assert sum(plan.values()) == 12
    assert load_text(tmp_path, pools + "[jail]\nuid_min = 100\nuid_max = 127\n")
    message = error_of(tmp_path, pools + "[jail]\nuid_min = 100\nuid_max = 126\n")
    assert "28 workers" in message


def test_uid_pool_counts_default_pool_sizes(tmp_path: Path) -> None:
    plain = default_pool_size()
    alive = 2 * (2 * plain + max(1, plain // 2)) + 4
    message = error_of(tmp_path, f"[jail]\nuid_min = 100\nuid_max = {100 + alive - 2}\n")
    assert f"{alive} workers" in message


@pytest.mark.parametrize(
    "listen",
    ["localhost", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http", "::1:8194",
     "[::1:8194", "[zz]:8194", ":8194", "none:"],
)  # fmt: skip
def test_bad_listen_names_the_key_and_line(tmp_path: Path, listen: str) -> None:
    message = error_of(tmp_path, f'[http]\nlisten = "{listen}"\n')
    assert message.startswith(f"http.listen = {listen!r} ({tmp_path}/sandboxd.toml:2) must be")


@pytest.mark.parametrize(
    ("listen", "parsed"),
    [
        ("none", None),
        ("[::1]:8194", ("::1", 8194)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:8194", ("localhost", 8194)),
    ],
)
def test_good_listen_is_accepted(
    tmp_path: Path, listen: str, parsed: tuple[str, int] | None
) -> None:
    assert load_text(tmp_path, f'[http]\nlisten = "{listen}"\n').http.listen == listen
    assert parse_listen(listen) == parsed


# --- Environment overrides ---


@pytest.mark.parametrize(
    ("variable", "value", "key", "expected"),
    [
        ("API_KEY", "s3cret", "http.api_key", "s3cret"),
        ("MAX_WORKERS", "8", "limits.max_workers", 8),
        ("MAX_REQUESTS", "100", "limits.max_requests", 100),
        ("WORKER_TIMEOUT", "5", "limits.timeout", 5.0),
        ("ENABLE_NETWORK", "true", "network.mode", "allow"),
        ("ENABLE_NETWORK", "1", "network.mode", "allow"),
        ("SANDBOX_PORT", "9000", "http.listen", "127.0.0.1:9000"),
        ("ENABLE_PRELOAD", "true", "python3.enable_preload", True),
        ("NODEJS_PATH", "/opt/node/bin/node", "nodejs.path", "/opt/node/bin/node"),
        ("PIP_MIRROR_URL", "https://mirror.example/simple", "deps.index_url",
         "https://mirror.example/simple"),
    ],
)  # fmt: skip
def test_dify_sandbox_variable_sets_its_key(
    variable: str, value: str, key: str, expected: object
) -> None:
    section, _, name = key.partition(".")
    config = load_config("/dev/null", {variable: value})
    assert getattr(getattr(config, section), name) == expected


def test_worker_timeout_raises_max_timeout_to_at_least_itself() -> None:
    assert load_config("/dev/null", {"WORKER_TIMEOUT": "100"}).limits.max_timeout == 100.0
    assert load_config("/dev/null", {"WORKER_TIMEOUT": "5"}).limits.max_timeout == 60.0


@pytest.mark.parametrize(
    ("file_mode", "value", "mode"),
    [
        ("deny", "true", "allow"),
        ("reject", "True", "allow"),
        ("allow", "false", "deny"),
        ("allow", "0", "deny"),
        ("reject", "false", "reject"),
        ("deny", "false", "deny"),
    ],
)
def test_enable_network_false_only_takes_back_allow(
    tmp_path: Path, file_mode: str, value: str, mode: str
) -> None:
    text = f'[network]\nmode = "{file_mode}"\n'
    assert load_text(tmp_path, text, ENABLE_NETWORK=value).network.mode == mode


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("[::1]:8194", "[::1]:9000"), ("0.0.0.0:8194", "0.0.0.0:9000"), ("none", "none")],
)
def test_sandbox_port_keeps_the_host(tmp_path: Path, listen: str, expected: str) -> None:
    text = f'[http]\nlisten = "{listen}"\n'
    assert load_text(tmp_path, text, SANDBOX_PORT="9000").http.listen == expected


@pytest.mark.parametrize(
    ("variable", "value", "key", "expected"),
    [
        ("MAX_WORKERS", "four", "limits.max_workers", "expected `int`, got `str`"),
        ("MAX_WORKERS", "0", "limits.max_workers", "expected `int` >= 1"),
        ("MAX_REQUESTS", "true", "limits.max_requests", "expected `int`, got `str`"),
        ("WORKER_TIMEOUT", "15s", "limits.timeout", "expected `float`, got `str`"),
        ("WORKER_TIMEOUT", "-1", "limits.timeout", "expected `float` > 0"),
        ("ENABLE_NETWORK", "maybe", "network.mode", "expected `bool`, got `str`"),
        ("SANDBOX_PORT", "70000", "http.listen", "expected `int` <= 65535"),
        ("SANDBOX_PORT", "http", "http.listen", "expected `int`, got `str`"),
        ("ENABLE_PRELOAD", "yes", "python3.enable_preload", "expected `bool`, got `str`"),
        ("SANDBOXD_LIMITS_MEMORY_MB", "lots", "limits.memory_mb", "expected `int`, got `str`"),
        ("SANDBOXD_NETWORK_MODE", "open", "network.mode",
         "expected one of: 'deny', 'reject', 'allow'"),
        ("SANDBOXD_JAIL_UID_MIN", "0", "jail.uid_min", "expected `int` >= 1"),
    ],
)  # fmt: skip
def test_bad_variable_names_the_variable_and_key(
    variable: str, value: str, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("/dev/null", {variable: value})
    message = str(caught.value)
    assert message.startswith(f"{key} (environment variable {variable}={value!r}): ")
    assert expected in message


def test_rule_broken_by_a_variable_names_variable_and_file_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[limits]\nmax_requests = 10\n", MAX_WORKERS="20")
    assert message == (
        f"limits.max_requests = 10 ({tmp_path}/sandboxd.toml:2) must be >= limits.max_workers;"
        " limits.max_workers = 20 (environment variable MAX_WORKERS)"
    )


def test_rule_broken_against_a_default_says_default() -> None:
    with pytest.raises(ConfigError, match=r"limits.max_requests = 50 \(default\)"):
        load_config("/dev/null", {"MAX_WORKERS": "100"})


def test_empty_variable_counts_as_unset() -> None:
    assert load_config("/dev/null", {"MAX_WORKERS": "", "API_KEY": ""}) == Config()


@pytest.mark.parametrize(
    ("variable", "value", "key", "expected"),
    [
        ("SANDBOXD_LIMITS_MEMORY_MB", "512", "limits.memory_mb", 512),
        ("SANDBOXD_LIMITS_TIMEOUT", "2.5", "limits.timeout", 2.5),
        ("SANDBOXD_NETWORK_MODE", "reject", "network.mode", "reject"),
        ("SANDBOXD_PYTHON3_ENABLE_PRELOAD", "true", "python3.enable_preload", True),
        ("SANDBOXD_HTTP_LISTEN", "none", "http.listen", "none"),
        ("SANDBOXD_SERVER_SOCKET_GROUP", "dify", "server.socket_group", "dify"),
        ("SANDBOXD_NODEJS_POOL_SIZE", "1", "nodejs.pool_size", 1),
    ],
)
def test_generic_variable_sets_its_key(
    variable: str, value: str, key: str, expected: object
) -> None:
    section, _, name = key.partition(".")
    config = load_config("/dev/null", {variable: value})
    assert getattr(getattr(config, section), name) == expected


def test_every_key_has_a_generic_variable() -> None:
    defaults = msgspec.to_builtins(Config())
    environ = {
        f"SANDBOXD_{section}_{key}".upper(): str(value).lower()
        for section, keys in defaults.items()
        for key, value in keys.items()
    }
    assert len(environ) == len(ALL_KEYS)
    assert load_config("/dev/null", environ) == Config()


def test_generic_variable_wins_over_the_dify_name() -> None:
    environ = {"MAX_WORKERS": "2", "SANDBOXD_LIMITS_MAX_WORKERS": "3"}
    assert load_config("/dev/null", environ).limits.max_workers == 3


def test_variable_overrides_the_file(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[limits]\nmemory_mb = 128\n", MAX_WORKERS="2") == Config(
        limits=config_module.LimitsConfig(memory_mb=128, max_workers=2)
    )
    config = load_text(tmp_path, "[limits]\nmemory_mb = 128\n", SANDBOXD_LIMITS_MEMORY_MB="512")
    assert config.limits.memory_mb == 512


def test_misspelt_generic_variable_is_an_error() -> None:
    with pytest.raises(
        ConfigError,
        match="environment variable SANDBOXD_LIMITS_MEMORY: no such config key"
        r" \(did you mean SANDBOXD_LIMITS_MEMORY_MB\?\)",
    ):
        load_config("/dev/null", {"SANDBOXD_LIMITS_MEMORY": "512"})


def test_other_sandboxd_variables_are_left_alone() -> None:
    assert load_config("/dev/null", {"SANDBOXD_TEST_ROOT": "/x"}) == Config()


def test_rule_broken_against_a_default_in_a_present_section_says_default(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[jail]\nuid_max = 61005\n")
    assert message.endswith("jail.uid_min = 61000 (default)")


def test_readme_documents_every_config_key_with_its_default() -> None:
    """The README's key table (the man-page-like reference) cannot drift from the structs."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    documented = dict(re.findall(r"^\| `(\w+\.\w+)` \| `([^`]*)` \|", readme, re.MULTILINE))
    config = Config()
    expected = {
        f"{section}.{key}": getattr(getattr(config, section), key)
        for section in config.__struct_fields__
        for key in getattr(config, section).__struct_fields__
    }
    assert set(documented) == set(expected)
    for key, text in documented.items():
        assert tomllib.loads(f"v = {text}")["v"] == expected[key], key


def test_byte_budget_must_hold_the_largest_request_with_its_copies(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[clients]\nmax_buffered_bytes = 1000\n")
    assert message.startswith("clients.max_buffered_bytes = 1000 (")
    assert ">= 3 x server.max_line_bytes" in message
