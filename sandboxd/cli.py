"""The `sandboxd` command: serve, run, check, deps, mcp."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import textwrap
from collections.abc import Sequence

import msgspec

from sandboxd import __version__, deps_cli, runfiles
from sandboxd.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from sandboxd.protocol import LANGUAGES

EXIT_TIMEOUT = 124
EXIT_SANDBOX_ERROR = 125

DESCRIPTION = """\
sandboxd runs untrusted Python 3 and Node.js code for multi-tenant services, in
warm, pre-forked workers that each live in a private copy of a read-only root,
namespaced, unprivileged and under seccomp, and speaks the dify-sandbox HTTP API so
Dify can use it as is.
"""

EPILOG = """\
commands:
  serve   run the daemon in the foreground (root); systemd's sandboxd.socket
          normally starts it
  run     send code to a running daemon over its Unix socket and print what
          the code printed; exits with the code's exit status
  check   print the configuration in force and what this host supports
  deps    sync or list the packages sandboxed code can import (deps --help)
  mcp     a Model Context Protocol server on stdio for LLM agents, forwarding
          to the daemon's socket (needs the mcp Python SDK)

files:
  /etc/sandboxd/sandboxd.toml   configuration; every key is documented there
  /run/sandboxd/sandboxd.sock   the native NDJSON socket (group sandboxd)

environment (overrides the file): API_KEY, MAX_WORKERS, MAX_REQUESTS,
WORKER_TIMEOUT, ENABLE_NETWORK, ENABLE_PRELOAD, SANDBOX_PORT, NODEJS_PATH,
PIP_MIRROR_URL, and SANDBOXD_<SECTION>_<KEY> for any key.

exit status of `run`: the code's own exit status; 124 on timeout; 125 when
the sandbox or the protocol failed; 128+N when the code was killed by signal N.
"""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandboxd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the daemon in the foreground (root)",
        description="Run the daemon in the foreground. Needs root: it builds namespaces, "
        "jail roots and cgroups for its workers. Stops gracefully on SIGTERM or SIGINT.",
    )
    _config_option(serve)
    serve.add_argument("--socket", metavar="PATH", help="native NDJSON socket ([server] socket)")
    serve.add_argument(
        "--http", metavar="ADDR:PORT|none", help="HTTP listen address, or none ([http] listen)"
    )
    serve.add_argument(
        "--state-dir", metavar="DIR", help="lasting state, e.g. dependencies ([server] state_dir)"
    )
    serve.add_argument("--runtime-dir", metavar="DIR", help="run-time state ([server] runtime_dir)")

    run = commands.add_parser(
        "run",
        help="run code through a running daemon",
        description="Send code to a running daemon and print the run's stdout and stderr "
        "to this command's own. Exit status: the code's; 124 on timeout; 125 on a sandbox "
        "or protocol error; 128+N if the code was killed by signal N.",
    )
    _daemon_socket_option(run)
    run.add_argument("--language", choices=LANGUAGES, default="python3")
    run.add_argument("--timeout", type=float, metavar="S", help="seconds (capped by the daemon)")
    run.add_argument("--memory", type=int, metavar="MIB", help="memory limit in MiB (capped)")
    run.add_argument("--stdin", metavar="TEXT", help="text the code reads on its stdin")
    run.add_argument("--json", action="store_true", help="print the whole result as JSON")
    run.add_argument(
        "--file",
        dest="send_files",
        action="append",
        default=[],
        metavar="F",
        help="send file F, written into the run's working directory under its base name "
        "(repeatable; python3)",
    )
    run.add_argument(
        "--out",
        metavar="DIR",
        help="write the figures the run left open and the files it wrote under /tmp/out into DIR "
        "(never replacing a file already there)",
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", dest="code", metavar="CODE", help="the code itself")
    source.add_argument("file", nargs="?", metavar="FILE", help="a file of code, or - for stdin")

    check = commands.add_parser(
        "check",
        help="print the configuration in force and host support",
        description="Load the configuration (reporting any error with its key and line) "
        "and print it with what this host supports: root, cgroups, node, and each "
        "language's effective seccomp allow-list (extra_syscalls included).",
    )
    _config_option(check)
    deps_cli.add_parsers(commands)

    mcp = commands.add_parser(
        "mcp",
        help="serve MCP on stdio for LLM agents",
        description="Serve the Model Context Protocol on stdin/stdout: tools run_python and "
        "run_javascript, each forwarded as one run to the daemon's Unix socket, so the "
        "socket's permissions decide who may run code. An agent host starts it as its "
        "user. Needs the mcp Python SDK (mcp>=2,<3), which the .deb does not carry.",
    )
    _daemon_socket_option(mcp)
    return parser


def _daemon_socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=Config().server.socket,
        help="the daemon's socket (default: %(default)s)",
    )


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help=f"configuration file (default: {DEFAULT_CONFIG_PATH})"
    )


def _overridden(config: Config, args: argparse.Namespace) -> Config:
    server = config.server
    if args.socket:
        server = msgspec.structs.replace(server, socket=args.socket)
    if args.state_dir:
        server = msgspec.structs.replace(server, state_dir=os.path.abspath(args.state_dir))
    if args.runtime_dir:
        server = msgspec.structs.replace(server, runtime_dir=os.path.abspath(args.runtime_dir))
    config = msgspec.structs.replace(config, server=server)
    if args.http:
        http = msgspec.structs.replace(config.http, listen=args.http)
        config = msgspec.structs.replace(config, http=http)
    return config


def _serve(args: argparse.Namespace) -> int:
    import trio

    from sandboxd import daemon
    from sandboxd.http import ExposureError

    if os.geteuid() != 0:
        print(
            "sandboxd serve: must run as root (it builds namespaces, jail roots and cgroups)",
            file=sys.stderr,
        )
        return 1
    logging.basicConfig(level=logging.INFO, format="sandboxd: %(levelname)s %(message)s")

    def current_config() -> Config:
        return _overridden(load_config(args.config), args)

    try:
        trio.run(daemon.serve, current_config(), current_config)
    except (daemon.StartupError, ExposureError) as error:
        print(f"sandboxd serve: {error}", file=sys.stderr)
        return 1
    return 0


def _read_code(args: argparse.Namespace) -> str:
    if args.code is not None:
        return str(args.code)
    if args.file == "-":
        return sys.stdin.read()
    with open(args.file, encoding="utf-8") as handle:
        return handle.read()


def _exchange(path: str, request: dict[str, object]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    answer: dict[str, object] = json.loads(data.split(b"\n", 1)[0])
    return answer


def _run(args: argparse.Namespace) -> int:
    request: dict[str, object] = {"language": args.language, "code": _read_code(args)}
    for key, value in (
        ("timeout", args.timeout),
        ("memory_mb", args.memory),
        ("stdin", args.stdin),
    ):
        if value is not None:
            request[key] = value
    try:
        if args.send_files:
            request["files"] = runfiles.request_files(args.send_files)
    except runfiles.RunFilesError as error:
        print(f"sandboxd run: {error}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR
    try:
        answer = _exchange(args.socket, request)
    except (OSError, ValueError) as error:
        print(f"sandboxd run: cannot talk to the daemon at {args.socket}: {error}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR
    if args.json:
        print(json.dumps(answer, ensure_ascii=False, indent=2))
    if "error" in answer:
        problem = answer["error"]
        assert isinstance(problem, dict)
        if not args.json:
            print(f"sandboxd run: {problem['code']}: {problem['message']}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR
    if not args.json:
        sys.stdout.write(str(answer["stdout"]))
        sys.stdout.flush()
        sys.stderr.write(str(answer["stderr"]))
    if args.out is not None:
        try:
            runfiles.save(answer, args.out)
        except runfiles.RunFilesError as error:
            print(f"sandboxd run: {error}", file=sys.stderr)
            return EXIT_SANDBOX_ERROR
    status = answer["status"]
    if status not in ("ok", "error") and not args.json:
        print(f"sandboxd run: the run ended with status {status}", file=sys.stderr)
    if status == "timeout":
        return EXIT_TIMEOUT
    exit_code, signum = answer.get("exit_code"), answer.get("signal")
    if isinstance(exit_code, int):
        return exit_code
    if isinstance(signum, int):
        return 128 + signum
    return EXIT_SANDBOX_ERROR


def _check(args: argparse.Namespace) -> int:
    from sandboxd.daemon import StartupError, choose_cgroups

    config = load_config(args.config)
    print(
        textwrap.dedent(f"""\
        config file: {args.config or DEFAULT_CONFIG_PATH}
        root: {"yes" if os.geteuid() == 0 else "no (serve needs root)"}
        nodejs: {config.nodejs.path if os.access(config.nodejs.path, os.X_OK) else "not installed"}
        network mode: {config.network.mode}
        http: {config.http.listen}""")
    )
    try:
        backend = choose_cgroups(config)
    except StartupError as error:
        print(f"cgroups: unavailable: {error}")
        return 1
    print(f"cgroups ({config.limits.cgroups}): {backend.name if backend else 'off (rlimits only)'}")
    if backend is not None:
        backend.close()
    print(json.dumps(msgspec.to_builtins(config), indent=2))
    _print_seccomp(config)
    return 0


def _print_seccomp(config: Config) -> None:
    """The effective seccomp allow-list of each language, extra_syscalls included."""
    from sandboxd.jail import seccomp
    from sandboxd.runtimes import registry

    sections = {runtime.seccomp_policy: runtime.section for runtime in registry.RUNTIMES}
    for language, section in sections.items():
        extra = getattr(config, section).extra_syscalls
        allowed = sorted(seccomp.policy_for(language, extra).allowed_names())
        print(f"seccomp {language}: {len(allowed)} calls allowed, extra: {', '.join(extra) or '-'}")
        print(
            textwrap.fill(" ".join(allowed), width=100, initial_indent="  ", subsequent_indent="  ")
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "run":
            return _run(args)
        if args.command == "mcp":
            from sandboxd import mcpserver

            return mcpserver.main(args.socket)
        if args.command == "deps":
            return deps_cli.run(args, load_config(args.config))
        return _check(args)
    except ConfigError as error:
        print(f"sandboxd: {error}", file=sys.stderr)
        return 1
