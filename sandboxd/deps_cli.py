"""`sandboxd deps sync` and `sandboxd deps list`: the host admin's view of the environments."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import msgspec

from sandboxd import deps
from sandboxd.config import Config
from sandboxd.jobs import Dependency
from sandboxd.runtimes import DepsLayout, registry

RELOAD_HINT = (
    "The running daemon switches to a new environment on `systemctl reload sandboxd` (SIGHUP)."
)

EPILOG = """\
files:
  /etc/sandboxd/python-requirements.txt   pip requirements of the python3 jail
  /etc/sandboxd/node-packages.json        package.json of the nodejs jail
  /var/lib/sandboxd/{python,node}/        environments ([server] state_dir)

A sync builds a new environment next to the live one and switches to it only
when the install succeeded; runs keep using the live one until the daemon is
reloaded (systemctl reload sandboxd). [deps] keys (or SANDBOXD_DEPS_* variables)
choose other files; PIP_MIRROR_URL or [deps] index_url the package index.
"""


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `deps` with its `sync` and `list` subcommands to sandboxd's command parser."""
    parser = commands.add_parser(
        "deps",
        help="install or list the packages sandboxed code can use",
        description="Manage the Python packages and npm packages that sandboxed code can "
        "import or require.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="deps_command", required=True, metavar="ACTION")
    sync = actions.add_parser(
        "sync",
        help="build new environments from the requirements files",
        description="Install the packages listed in the requirements files into new "
        "environments and make them live. Skips a language whose file is unchanged since "
        "its live environment was built, unless --force. A failed install leaves the live "
        "environment as it was.",
    )
    _common(sync)
    sync.add_argument("--force", action="store_true", help="rebuild even if nothing changed")
    sync.add_argument(
        "--offline",
        action="store_true",
        help="no network: pip installs from --wheelhouse only, npm from its cache only",
    )
    sync.add_argument("--wheelhouse", metavar="DIR", help="a directory of wheels for pip")
    listing = actions.add_parser(
        "list",
        help="print the installed packages and versions",
        description="Print the name and version of every package the live environments hold.",
    )
    _common(listing)
    listing.add_argument("--json", action="store_true", help='print {"python3": [...], ...}')


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--language", choices=(*_names(), "all"), default="all", help="default: all"
    )
    parser.add_argument("--config", metavar="FILE", help="configuration file")
    parser.add_argument(
        "--state-dir", metavar="DIR", help="where the environments live ([server] state_dir)"
    )


def _names() -> list[str]:
    """The runtimes with a dependency environment of their own (registry order)."""
    return [runtime.name for runtime in registry.with_deps()]


def _layouts(args: argparse.Namespace) -> list[tuple[str, DepsLayout]]:
    chosen = _names() if args.language == "all" else [args.language]
    found = []
    for name in chosen:
        environment = registry.named(name).deps
        assert environment is not None
        found.append((name, environment()))
    return found


def _state_dir(args: argparse.Namespace, config: Config) -> str:
    return os.path.abspath(args.state_dir) if args.state_dir else config.server.state_dir


def _sync(args: argparse.Namespace, config: Config) -> int:
    state_dir = _state_dir(args, config)
    status = 0
    changed = False
    for language, layout in _layouts(args):
        source = layout.source(config.deps)
        if layout.tool and args.language == "all" and shutil.which(layout.tool) is None:
            print(f"{language}: skipped ({layout.tool} is not installed)")
            continue
        before = deps.live_env(state_dir, layout.directory)
        started = time.monotonic()
        try:
            live = layout.sync(config.deps, state_dir, args.offline, args.wheelhouse, args.force)
        except deps.SyncError as error:
            print(f"sandboxd deps sync: {language}: {error}", file=sys.stderr)
            print(f"{language}: the live environment is unchanged", file=sys.stderr)
            status = 1
            continue
        if deps.live_env(state_dir, layout.directory) == before:
            print(f"{language}: {source} unchanged since the live environment was built")
            print("  (--force rebuilds it)")
        else:
            changed = True
            print(f"{language}: installed {source} in {time.monotonic() - started:.1f} s")
        print(f"  {live}")
        _print_items(layout.installed(layout.live(state_dir)))
    if changed:
        print(RELOAD_HINT)
    return status


def _list(args: argparse.Namespace, config: Config) -> int:
    state_dir = _state_dir(args, config)
    found = {name: layout.installed(layout.live(state_dir)) for name, layout in _layouts(args)}
    if args.json:
        print(json.dumps(msgspec.to_builtins(found), indent=2))
        return 0
    for language, items in found.items():
        print(f"{language}:")
        _print_items(items)
    return 0


def _print_items(items: list[Dependency]) -> None:
    for item in items:
        print(f"  {item.name} {item.version}")
    if not items:
        print("  (no packages)")


def run(args: argparse.Namespace, config: Config) -> int:
    """Carry out `sandboxd deps ...`; the exit status."""
    if args.deps_command == "sync":
        return _sync(args, config)
    return _list(args, config)
