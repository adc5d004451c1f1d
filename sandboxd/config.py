"""sandboxd's configuration: one msgspec struct tree, the single source of truth.

Every field has a default and a one-line comment; etc/sandboxd/sandboxd.toml
repeats them for the host admin. Loading (TOML file, environment overrides,
errors naming key and line) lives below the structs.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal, NamedTuple, Protocol, get_args, get_origin

import msgspec

from sandboxd.budget import REQUEST_COPIES, request_cost
from sandboxd.jail import network, seccomp

NetworkMode = Literal["deny", "reject", "allow"]
CgroupMode = Literal["systemd", "auto", "off"]

DEFAULT_CONFIG_PATH = "/etc/sandboxd/sandboxd.toml"

# Field constraints, checked by msgspec while decoding (so errors name the key).
PosInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
FileMode = Annotated[int, msgspec.Meta(ge=0, le=0o777)]
# Never root; 2**32-1 is (uid_t)-1, which setresuid reads as "leave unchanged".
Uid = Annotated[int, msgspec.Meta(ge=1, le=2**32 - 2)]
HostName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]  # HOST_NAME_MAX


def default_pool_size() -> int:
    """Two ready workers per core: enough to hide refill latency on a busy host."""
    return 2 * (os.cpu_count() or 1)


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Path of the native NDJSON Unix socket (ignored when systemd passes one in).
    socket: str = "/run/sandboxd/sandboxd.sock"
    # Permission bits of that socket; group below gets read/write.
    socket_mode: FileMode = 0o660
    # Group owning the socket when it exists on the host; "" keeps root's group.
    socket_group: str = "sandboxd"
    # Longest NDJSON request line in bytes; longer lines get too_large and a close.
    max_line_bytes: PosInt = 16 * 1024 * 1024
    # Where the daemon keeps run-time state (jail mount points); wiped at start.
    runtime_dir: str = "/run/sandboxd"
    # Where the daemon keeps lasting state (dependency environments).
    state_dir: str = "/var/lib/sandboxd"
    # Seconds to let in-flight runs finish on stop before they are killed.
    stop_timeout: Seconds = 30.0


class HttpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # ADDR:PORT for the dify-sandbox compatible HTTP API, or "none" to disable it.
    listen: str = "127.0.0.1:8194"
    # Value clients must send in X-Api-Key (compared in constant time).
    api_key: str = "dify-sandbox"
    # Largest request body in bytes; larger bodies get 413.
    max_body_bytes: PosInt = 16 * 1024 * 1024
    # Seconds a client may take to send a request's head and body.
    header_timeout: Seconds = 10.0
    # Seconds an idle keep-alive connection is kept open.
    idle_timeout: Seconds = 60.0


class LimitsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Runs executing at once, over all languages (dify-sandbox: MAX_WORKERS).
    max_workers: PosInt = 4
    # Runs executing plus waiting; beyond it requests get overloaded/503 (MAX_REQUESTS).
    max_requests: PosInt = 50
    # Default wall-clock timeout of a run in seconds, queue wait included (WORKER_TIMEOUT).
    timeout: Seconds = 15.0
    # Largest timeout a request may ask for.
    max_timeout: Seconds = 60.0
    # Default memory limit of a run in MiB.
    memory_mb: PosInt = 256
    # Largest memory limit a request may ask for.
    max_memory_mb: PosInt = 1024
    # Processes and threads a run may have at once.
    tasks: PosInt = 64
    # Bytes of stdout+stderr kept; past it the run is killed with output_limit.
    output_bytes: PosInt = 8 * 1024 * 1024
    # Largest file a run may write, in MiB.
    file_size_mb: PosInt = 64
    # Size of the run's private /tmp, in MiB.
    tmp_size_mb: PosInt = 64
    # Open files a run may hold.
    open_files: PosInt = 256
    # CPU share of a run in percent of one core (cgroup quota; 0 = unlimited).
    cpu_percent: NonNegInt = 100
    # "systemd": transient scopes, refuse to start without them; "auto": systemd,
    # else the host's cgroupfs, else rlimits only (with a warning); "off": rlimits only.
    cgroups: CgroupMode = "auto"


class JailConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # First uid (and gid) of the pool that gives every live worker its own identity.
    uid_min: Uid = 61000
    # Last uid (and gid) of that pool, inclusive.
    uid_max: Uid = 61999
    # Host name a run sees.
    hostname: HostName = "sandbox"


class NetworkConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # What enable_network=true gets: "deny" runs without network, "reject" answers
    # like dify-sandbox (-400), "allow" gives the run egress (ENABLE_NETWORK=true).
    mode: NetworkMode = "deny"
    # Proxy ("http://HOST:PORT" or "socks5://HOST:PORT") that runs with network go through:
    # they get it in HTTP_PROXY/HTTPS_PROXY and reach that address:port only; "" for none.
    proxy: str = ""


class PythonConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Ready python3 workers kept warm; 0 means two per core.
    pool_size: NonNegInt = 0
    # Run a request's preload (inside the jail, right before the code) (ENABLE_PRELOAD).
    enable_preload: bool = False
    # System calls added to the python3 seccomp allow-list, by name (ALLOWED_SYSCALLS).
    extra_syscalls: list[str] = msgspec.field(default_factory=list)
    # Modules (comma-separated) the data-science template imports before forking the
    # data-science pools' workers (a run goes there when its code imports one of them),
    # each only when the jail can import it: Debian's python3-numpy, -pandas and
    # -matplotlib (the .deb recommends them; bound into those pools' jail only) or the
    # synced environment, whose versions shadow Debian's. None installed: no such pool.
    # Their import-time code runs as root before any user code: the admin chose them.
    # matplotlib runs with the Agg backend.
    warm_modules: str = "numpy,pandas,matplotlib.pyplot"


class NodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The node binary whose installation the node jail holds (NODEJS_PATH).
    path: str = "/usr/bin/node"
    # Ready nodejs workers kept warm; 0 means two per core.
    pool_size: NonNegInt = 0
    # System calls added to the nodejs seccomp allow-list, by name (ALLOWED_SYSCALLS).
    extra_syscalls: list[str] = msgspec.field(default_factory=list)


class DepsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Requirements file of the jail's Python environment.
    python_requirements: str = "/etc/sandboxd/python-requirements.txt"
    # package.json of the jail's node_modules.
    node_packages: str = "/etc/sandboxd/node-packages.json"
    # Package index for pip; "" uses pip's own configuration (PIP_MIRROR_URL).
    index_url: str = ""


class ClientsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Connections served at once per listening socket; past it a new one gets overloaded
    # (HTTP 503) and is closed.
    max_connections: PosInt = 256
    # Bytes all connections together may hold: unfinished lines and bodies, requests in
    # flight (3 copies each), unsent answers; a request past it gets overloaded (HTTP 503).
    max_buffered_bytes: PosInt = 64 * 1024 * 1024
    # Bytes of answers not yet sent on one NDJSON connection; past it the connection
    # closes (one answer always goes out whole, however large).
    max_unsent_bytes: PosInt = 8 * 1024 * 1024
    # Seconds one NDJSON answer may take to be sent; a client that does not read is closed.
    send_timeout: Seconds = 10.0


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    jail: JailConfig = msgspec.field(default_factory=JailConfig)
    network: NetworkConfig = msgspec.field(default_factory=NetworkConfig)
    python3: PythonConfig = msgspec.field(default_factory=PythonConfig)
    nodejs: NodeConfig = msgspec.field(default_factory=NodeConfig)
    deps: DepsConfig = msgspec.field(default_factory=DepsConfig)
    clients: ClientsConfig = msgspec.field(default_factory=ClientsConfig)


# --- Loading -----------------------------------------------------------------------------------


class ConfigError(Exception):
    """A configuration value the daemon cannot start with; the message names the key,
    where its value came from (file:line or environment variable) and what was expected."""


def effective_pool_size(size: int) -> int:
    """A pool_size as configured, with 0 meaning default_pool_size()."""
    return size or default_pool_size()


class RuntimeSection(Protocol):
    """What every runtime's config section ([python3], [nodejs]) has."""

    @property
    def pool_size(self) -> int: ...

    @property
    def extra_syscalls(self) -> list[str]: ...


# (runtime name, with network): one pool of ready workers.
PoolPlan = dict[tuple[str, bool], int]


def pool_sizes(config: Config, runtimes: Iterable[str], network: bool) -> PoolPlan:
    """The pools a generation keeps for the named runtimes, in warm-up order, with their
    sizes: each runtime's pool (its section's pool_size over its pool_divisor); with
    network (an egress namespace), a pool half as big for runs that asked for it."""
    from sandboxd.runtimes import registry

    served = set(runtimes)
    plan: PoolPlan = {}
    for runtime in registry.RUNTIMES:
        if runtime.name in served:
            section: RuntimeSection = getattr(config, runtime.section)
            size = effective_pool_size(section.pool_size)
            plan[(runtime.name, False)] = (
                size if runtime.pool_divisor == 1 else max(1, size // runtime.pool_divisor)
            )
    if network:
        for name, _ in list(plan):
            plan[(name, True)] = max(1, plan[(name, False)] // 2)
    return plan


def parse_listen(listen: str) -> tuple[str, int] | None:
    """http.listen as (host, port), None for "none"; ValueError when it is neither."""
    if listen == "none":
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"no port in 1..65535 in {listen!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"unclosed [ in {listen!r}")
        host = str(ipaddress.IPv6Address(host[1:-1]))
    elif not host or ":" in host or "[" in host or "]" in host:
        raise ValueError(f"bad host in {listen!r} (write IPv6 as [::1]:8194)")
    return host, int(port)


def _fields() -> dict[str, Any]:
    """Every config key in dotted form ("limits.timeout") with its type, in struct order."""
    return {
        f"{section.name}.{field.name}": field.type
        for section in msgspec.structs.fields(Config)
        for field in msgspec.structs.fields(section.type)
    }


_FIELDS = _fields()
_SECTIONS = tuple(field.name for field in msgspec.structs.fields(Config))


# --- Environment overrides: policy as data ---


def _replace(_old: Any, new: Any) -> Any:
    return new


def _network_mode(old: str, enabled: bool) -> str:
    """ENABLE_NETWORK=true gives runs egress; false only takes back an "allow"."""
    if enabled:
        return "allow"
    return "deny" if old == "allow" else old


def _listen_port(old: str, port: int) -> str:
    """SANDBOX_PORT keeps the host of http.listen; "none" stays off."""
    return old if old == "none" else f"{old.rpartition(':')[0]}:{port}"


Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


def _socks5_url(_old: str, value: str) -> str:
    """SOCKS5_PROXY: host:port, or a URL with its own socks5 scheme."""
    return value if "://" in value else f"socks5://{value}"


def _add_syscalls(old: list[str], text: str) -> list[str]:
    """ALLOWED_SYSCALLS: numbers or names, comma-separated, added to the configured ones."""
    added = [seccomp.syscall_from_text(item) for item in text.split(",") if item.strip()]
    return [*old, *(name for name in added if name not in old)]


class EnvOverride(NamedTuple):
    variable: str
    key: str  # the dotted config key it sets
    # (value so far, parsed variable) -> new value of the key
    combine: Callable[[Any, Any], Any] = _replace
    parse_as: Any = None  # None: the key's own type


DIFY_ENV: tuple[EnvOverride, ...] = (
    EnvOverride("API_KEY", "http.api_key"),
    EnvOverride("MAX_WORKERS", "limits.max_workers"),
    EnvOverride("MAX_REQUESTS", "limits.max_requests"),
    EnvOverride("WORKER_TIMEOUT", "limits.timeout"),
    # A default timeout above the cap raises the cap, so WORKER_TIMEOUT alone always works.
    EnvOverride("WORKER_TIMEOUT", "limits.max_timeout", max),
    EnvOverride("ENABLE_NETWORK", "network.mode", _network_mode, bool),
    EnvOverride("SANDBOX_PORT", "http.listen", _listen_port, Port),
    EnvOverride("ENABLE_PRELOAD", "python3.enable_preload"),
    EnvOverride("NODEJS_PATH", "nodejs.path"),
    EnvOverride("PIP_MIRROR_URL", "deps.index_url"),
    # Dify's compose sets both to its squid; a SOCKS5_PROXY wins over them (one proxy).
    EnvOverride("HTTP_PROXY", "network.proxy"),
    EnvOverride("HTTPS_PROXY", "network.proxy"),
    EnvOverride("SOCKS5_PROXY", "network.proxy", _socks5_url),
    # dify-sandbox's list of extra calls applies to both runtimes (it adds, never replaces).
    EnvOverride("ALLOWED_SYSCALLS", "python3.extra_syscalls", _add_syscalls, str),
    EnvOverride("ALLOWED_SYSCALLS", "nodejs.extra_syscalls", _add_syscalls, str),
)
# SANDBOXD_<SECTION>_<KEY> for every key; applied after the dify names, so it wins.
GENERIC_ENV: tuple[EnvOverride, ...] = tuple(
    EnvOverride("SANDBOXD_" + key.replace(".", "_").upper(), key) for key in _FIELDS
)
ENV_OVERRIDES = DIFY_ENV + GENERIC_ENV
_GENERIC_PREFIXES = tuple(f"SANDBOXD_{section.upper()}_" for section in _SECTIONS)


# --- Where each value came from ---

_TABLE_LINE = re.compile(r"\s*\[\[?\s*([\w.-]+)\s*\]")
_KEY_LINE = re.compile(r"\s*([\w.-]+)\s*=")


def _key_lines(text: str, data: dict[str, Any]) -> dict[str, int]:
    """The line of each section and key set in the file, keyed "section.key".

    tomllib keeps no positions; a plain scan of `[section]` and `key = value` lines is
    enough for a hand-written config file. A key set in an inline table gets its
    section's line.
    """
    scanned: dict[str, int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        if table := _TABLE_LINE.match(line):
            section = table[1]
            scanned.setdefault(section, number)
        elif key := _KEY_LINE.match(line):
            scanned.setdefault(f"{section}.{key[1]}" if section else key[1], number)
    lines: dict[str, int] = {}
    for name, value in data.items():
        names = [f"{name}.{key}" for key in value] if isinstance(value, dict) else []
        for dotted in [name, *names]:
            if found := scanned.get(dotted) or scanned.get(name):
                lines[dotted] = found
    return lines


@dataclasses.dataclass
class _Sources:
    path: str
    lines: dict[str, int]  # key -> line in the file
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> variable

    def where(self, key: str) -> str:
        if key in self.env:
            return f"environment variable {self.env[key]}"
        if key in self.lines:
            return f"{self.path}:{self.lines[key]}"
        return "default"


# --- Loading ---

_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`(?: - at `\$\.(.*)`)?")
_AT = re.compile(r"(.*) - at `\$\.(.*)`")


def _decode(raw: dict[str, Any], sources: _Sources) -> Config:
    """The Config for raw (plain values), or a ConfigError naming the bad key and its source."""
    try:
        return msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
    if unknown := _UNKNOWN.fullmatch(message):
        name, parent = unknown[1], unknown[2] or ""
        key = f"{parent}.{name}" if parent else name
        known = [k.rpartition(".")[2] for k in _FIELDS if k.startswith(parent + ".")]
        what = f"key in [{parent}]" if parent else "section"
        problem = f"unknown {what}; known: {', '.join(known or _SECTIONS)}"
        if guess := difflib.get_close_matches(name, known or _SECTIONS, n=1):
            problem += f" (did you mean {guess[0]}?)"
        raise ConfigError(f"{key} ({sources.where(key)}): {problem}")
    at = _AT.fullmatch(message)
    if at is None:  # msgspec always names a path below the root; keep its words if not
        raise ConfigError(f"{sources.path}: {message}")
    key = at[2]
    raise ConfigError(f"{key} ({sources.where(key)}): {_problem(at[1], _FIELDS.get(key))}")


def _problem(message: str, kind: Any) -> str:
    """msgspec's complaint about a value, in our words, with the choices of a Literal."""
    problem = message[0].lower() + message[1:]
    if get_origin(kind) is Literal:
        problem += f"; expected one of: {', '.join(map(repr, get_args(kind)))}"
    return problem


def _read(path: str, required: bool) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: config file not found") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None


def _parse_toml(text: str, path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"at line (\d+)", str(exc))
        raise ConfigError(f"{path}:{line[1] if line else ''}: invalid TOML: {exc}") from None


def _is_list(kind: Any) -> bool:
    return get_origin(kind) is list


def _list_items(text: str) -> Any:
    """A list key's variable: a TOML array ("[\"a\", \"b\"]") or comma-separated items."""
    if text.lstrip().startswith("["):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text  # msgspec then says an array was expected
    return [item.strip() for item in text.split(",") if item.strip()]


def _apply_env(config: Config, environ: Mapping[str, str], sources: _Sources) -> Config:
    known = {override.variable for override in ENV_OVERRIDES}
    for name in environ:
        if name.startswith(_GENERIC_PREFIXES) and name not in known:
            guess = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise ConfigError(f"environment variable {name}: no such config key{hint}")
    raw: dict[str, dict[str, Any]] = msgspec.to_builtins(config)
    for override in ENV_OVERRIDES:
        text = environ.get(override.variable, "")
        if not text:  # an empty variable counts as unset, as in dify-sandbox
            continue
        section, _, name = override.key.partition(".")
        kind = override.parse_as or _FIELDS[override.key]
        try:
            value = msgspec.convert(
                _list_items(text) if _is_list(kind) else text, kind, strict=False
            )
        except msgspec.ValidationError as exc:
            where = f"environment variable {override.variable}={text!r}"
            raise ConfigError(f"{override.key} ({where}): {_problem(str(exc), kind)}") from None
        new = override.combine(raw[section][name], value)
        if new != raw[section][name]:  # else the value still comes from the file
            raw[section][name] = new
            sources.env[override.key] = override.variable
    return _decode(raw, sources)


# Pairs (key, other) where key must be >= other.
_AT_LEAST = (
    ("limits.max_timeout", "limits.timeout"),
    ("limits.max_memory_mb", "limits.memory_mb"),
    ("limits.max_requests", "limits.max_workers"),
    ("jail.uid_max", "jail.uid_min"),
)


def _check(config: Config, sources: _Sources) -> None:
    """Rules between keys (msgspec has checked each key's own range)."""

    def fail(key: str, must: str, other: str | None = None) -> ConfigError:
        message = f"{key} = {_value(config, key)!r} ({sources.where(key)}) must be {must}"
        if other:
            message += f"; {other} = {_value(config, other)!r} ({sources.where(other)})"
        return ConfigError(message)

    for key, other in _AT_LEAST:
        if _value(config, key) < _value(config, other):
            raise fail(key, f">= {other}", other)
    # The largest request the caps allow must fit in the total buffer, each of its copies.
    for other in ("server.max_line_bytes", "http.max_body_bytes"):
        if config.clients.max_buffered_bytes < request_cost(_value(config, other)):
            raise fail("clients.max_buffered_bytes", f">= {REQUEST_COPIES} x {other}", other)
    # Every worker that can be alive at once runs as its own uid: during a reload the
    # old generation's pools stay full until the new one's are warm, and max_workers run.
    from sandboxd.runtimes import registry

    plan = pool_sizes(
        config,
        (runtime.name for runtime in registry.RUNTIMES if runtime.enabled(config)),
        network=config.network.mode == "allow",
    )
    alive = 2 * sum(plan.values()) + config.limits.max_workers
    if config.jail.uid_max - config.jail.uid_min + 1 < alive:
        raise fail(
            "jail.uid_max",
            f">= jail.uid_min + {alive - 1}: two generations of pools ({sum(plan.values())}"
            f" workers each, network and data-science pools included) plus"
            f" limits.max_workers make {alive} workers, each needing its own uid",
            "jail.uid_min",
        )
    sections = dict.fromkeys(runtime.section for runtime in registry.RUNTIMES)
    for key in (f"{section}.extra_syscalls" for section in sections):
        for name in _value(config, key):
            if problem := seccomp.extra_syscall_problem(name):
                raise ConfigError(f"{key} ({sources.where(key)}): {problem}")
    if config.network.proxy:
        try:
            network.parse_proxy(config.network.proxy)
        except ValueError as error:
            where = sources.where("network.proxy")
            raise ConfigError(f"network.proxy ({where}): {error}") from None
    try:
        parse_listen(config.http.listen)
    except ValueError:
        raise fail(
            "http.listen", '"none" or HOST:PORT with a port in 1..65535 (IPv6 as [::1]:8194)'
        ) from None


def _value(config: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The daemon's Config: defaults, then the TOML file, then environment overrides.

    path None reads DEFAULT_CONFIG_PATH if it exists (a dev machine has none); an explicit
    path must exist. environ None means os.environ. Every problem is a ConfigError.
    """
    required = path is not None
    path = DEFAULT_CONFIG_PATH if path is None else path
    text = _read(path, required)
    data = _parse_toml(text or "", path)
    sources = _Sources(path, _key_lines(text or "", data))
    config = _decode(data, sources)
    config = _apply_env(config, os.environ if environ is None else environ, sources)
    _check(config, sources)
    return config
