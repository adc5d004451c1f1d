"""Dependency environments: the packages sandboxed code can import or require.

Theory of operation
-------------------
Each runtime with an environment of its own (its record's DepsLayout, runtimes/) keeps
them under the state directory:

    <state>/python/envs/<id>/venv/                a venv of the host's python3, no pip inside
    <state>/python/envs/<id>/site-packages        -> venv/lib/python3.X/site-packages
    <state>/python/envs/<id>/source.sha256        digest of the requirements it was built from
    <state>/python/current -> envs/<id>           the live environment
    <state>/python/previous -> envs/<id>          the one live before it
    <state>/node/envs/<id>/{package.json,node_modules/}, node/current, node/previous

A sync builds a complete new environment next to the live one (as root, outside
any jail, never as a side effect of serving: the host's pip installs into the venv
with --python, npm runs with --ignore-scripts), makes it read-only for everyone but
root, then switches `current` atomically (a new symlink renamed over the old one).
A failed build is removed and leaves `current` untouched. Old environments are
removed except the live one, the previous one, and any still bind-mounted into a
jail (a daemon that has not reloaded yet keeps serving from it). One lock file
per environment serialises syncs, whether from the CLI or the daemon's threads.

The daemon binds the live directory read-only into the jail (at a path of the
jail's own, put on sys.path or NODE_PATH) when it builds a generation of pools.
The paths handed out here (live_python_site_packages, live_node_modules) are real
paths, never paths through `current`: a generation keeps the environment it was
built with, and moves to a new one only when the daemon builds a new generation
(the update route, or a reload).
Blocking functions: the daemon calls them through trio.to_thread. Every failure
is a SyncError whose message says what to fix, with the installer's last lines.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sandboxd.jobs import Dependency

# The interpreter the python jail runs (rootfs.python_entries binds the same one):
# the environment is built from it so bytecode and compiled extensions match.
HOST_PYTHON = os.path.join(sys.base_prefix, "bin", "python3")
NPM = "npm"
# Longest an installer may run before the sync is abandoned.
INSTALL_TIMEOUT = 1800.0
# Lines of the installer's output quoted in a SyncError.
ERROR_TAIL_LINES = 15
# Installer output -> what the admin should do about it.
HINTS = {
    "No module named pip": "hint: install the host's pip (apt install python3-pip)",
    "no such option: --python": "hint: the host's pip is older than 22.3; upgrade python3-pip",
}

PIP_FLAGS = ("--no-input", "--disable-pip-version-check")
PIP_INSTALL_FLAGS = (
    # Bytecode written now: the jail's site-packages is read-only.
    "--compile",
    "--root-user-action=ignore",
    # An unreachable index fails after one retry, not pip's five backed-off ones (80 s
    # in the emulated guest), so a reload on a host without network is not held up.
    "--retries",
    "1",
)
NPM_FLAGS = (
    "--omit=dev",
    "--no-audit",
    "--no-fund",
    "--no-update-notifier",
    # Packages' install scripts would run as root: never.
    "--ignore-scripts",
)


class SyncError(Exception):
    """A sync that did not happen; the live environment is unchanged."""


class NoSourceFile(SyncError):
    """The requirements file or package.json does not exist: that language has nothing to
    sync. The daemon's routes answer success, as dify-sandbox does; the CLI says so."""


# --- Layout: environments, the live link, the switch and garbage collection --------------------


def _root(state_dir: str, language: str) -> str:
    return os.path.join(state_dir, language)


def live_env(state_dir: str, language: str) -> str | None:
    """Real path of the live environment of `language` ("python" or "node"), if any."""
    current = os.path.join(_root(state_dir, language), "current")
    return os.path.realpath(current) if os.path.isdir(current) else None


def live_python_site_packages(state_dir: str) -> str | None:
    """Real path of the live python environment's site-packages (what the jail binds)."""
    return _live_dir(state_dir, "python", "site-packages")


def live_node_modules(state_dir: str) -> str | None:
    """Real path of the live node environment's node_modules (what the jail binds)."""
    return _live_dir(state_dir, "node", "node_modules")


def _live_dir(state_dir: str, language: str, name: str) -> str | None:
    env = live_env(state_dir, language)
    if env is None:
        return None
    path = os.path.realpath(os.path.join(env, name))
    return path if os.path.isdir(path) else None


def live_digest(state_dir: str, language: str) -> str | None:
    """sha256 of the source file the live environment was built from."""
    env = live_env(state_dir, language)
    if env is None:
        return None
    try:
        with open(os.path.join(env, "source.sha256"), encoding="ascii") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return None


@contextmanager
def _locked(root: str) -> Iterator[None]:
    os.makedirs(os.path.join(root, "envs"), mode=0o755, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _point(root: str, name: str, env_id: str) -> None:
    """Make root/name a symlink to envs/<env_id>, atomically."""
    temporary = os.path.join(root, f".{name}.{os.getpid()}")
    if os.path.lexists(temporary):
        os.unlink(temporary)
    os.symlink(os.path.join("envs", env_id), temporary)
    os.replace(temporary, os.path.join(root, name))
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _target_id(root: str, name: str) -> str | None:
    link = os.path.join(root, name)
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def build_and_switch(
    state_dir: str, language: str, digest: str, build: Callable[[str], None], force: bool
) -> str:
    """Build a new environment with build(env_dir) and make it live; the live env's path.

    Skips the build when the live environment was built from the same digest, unless
    force. When build raises, its environment is removed and the live one stays.
    """
    root = _root(state_dir, language)
    try:
        with _locked(root):
            live = live_env(state_dir, language)
            if live is not None and not force and live_digest(state_dir, language) == digest:
                return live
            env_id = _new_id()
            env = os.path.join(root, "envs", env_id)
            os.mkdir(env, 0o755)
            try:
                build(env)
                with open(os.path.join(env, "source.sha256"), "w", encoding="ascii") as handle:
                    handle.write(digest + "\n")
                make_read_only(env)
            except BaseException:
                shutil.rmtree(env, ignore_errors=True)
                raise
            old = _target_id(root, "current")
            if old is not None:
                _point(root, "previous", old)
            _point(root, "current", env_id)
            collect_garbage(root)
            return os.path.realpath(env)
    except OSError as error:  # the state dir itself: permissions, a full disk
        raise SyncError(f"cannot update the environments in {root}: {error}") from None


def collect_garbage(root: str) -> list[str]:
    """Remove environments other than current, previous and those still mounted; their ids."""
    keep = {_target_id(root, "current"), _target_id(root, "previous")}
    mounted = mounted_roots()
    removed = []
    envs = os.path.join(root, "envs")
    for env_id in sorted(os.listdir(envs)):
        if env_id in keep or _in_use(os.path.join(envs, env_id), mounted):
            continue
        shutil.rmtree(os.path.join(envs, env_id))
        removed.append(env_id)
    return removed


def mounted_roots() -> set[str]:
    """The source path (relative to its file system) of every mount in every mount namespace.

    A jail's bind mount of an environment shows up here as that environment's
    site-packages or node_modules, in the zygote's and the workers' namespaces.
    """
    roots: set[str] = set()
    seen: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
            if namespace in seen:
                continue
            with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as handle:
                lines = handle.readlines()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the process is gone, or is not ours to look at
        seen.add(namespace)
        roots.update(line.split()[3] for line in lines)
    return roots


def _in_use(env: str, mounted: set[str]) -> bool:
    # Mount roots are relative to their file system, so compare path tails that
    # start at "<language>/envs/<id>": ids are unique, the tail identifies the env.
    tail = "/" + "/".join(os.path.realpath(env).split("/")[-3:]) + "/"
    return any(tail in root + "/" for root in mounted)


def make_read_only(top: str) -> None:
    """Root-owned, readable by all, writable by none but root: 0755 dirs, 0644/0755 files."""
    for directory, dirs, files in os.walk(top):
        os.chmod(directory, 0o755)
        for name in [*dirs, *files]:
            path = os.path.join(directory, name)
            if os.path.islink(path) or os.path.isdir(path):
                continue  # directories get their turn as `directory`
            mode = os.stat(path).st_mode
            os.chmod(path, 0o755 if mode & 0o111 else 0o644)


# --- Running installers ----------------------------------------------------------------------


def run_step(what: str, argv: list[str], cwd: str | None = None) -> str:
    """Run an installer step; its stdout, or a SyncError quoting its last lines."""
    # The admin's pip and npm configuration applies; the daemon's PYTHON* settings do not.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise SyncError(f"{what}: {argv[0]} is not installed on this host") from None
    except subprocess.TimeoutExpired:
        raise SyncError(f"{what}: gave up after {INSTALL_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        output = done.stderr.strip() or done.stdout.strip()
        tail = "\n".join(output.splitlines()[-ERROR_TAIL_LINES:])
        hints = [hint for marker, hint in HINTS.items() if marker in output]
        raise SyncError(
            "\n".join([f"{what} failed (exit status {done.returncode}):", tail, *hints])
        )
    return done.stdout


def _read_source(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise NoSourceFile(f"cannot read the {what} {path}: it does not exist") from None
    except OSError as error:
        raise SyncError(f"cannot read the {what} {path}: {error.strerror}") from None


# --- Python ----------------------------------------------------------------------------------


def sync_python(
    state_dir: str,
    requirements_file: str,
    index_url: str = "",
    offline: bool = False,
    wheelhouse: str | None = None,
    force: bool = False,
) -> str:
    """Install requirements_file into a new environment and make it live.

    Returns the real path of the live site-packages. offline installs only from
    wheelhouse (a directory of wheels); index_url replaces pip's configured index.
    Skips the install when the live environment was built from the same file
    content, unless force.
    """
    content = _read_source(requirements_file, "requirements file")
    source = ["-r", os.path.abspath(requirements_file)]
    if offline:
        source += ["--no-index", "--find-links", os.path.abspath(wheelhouse or "")]
    elif index_url:
        source += ["--index-url", index_url]
    if wheelhouse is not None and not offline:
        source += ["--find-links", os.path.abspath(wheelhouse)]

    def build(env: str) -> None:
        if offline and wheelhouse is None:
            raise SyncError("an offline sync needs a wheelhouse (a directory of wheels)")
        if wheelhouse is not None and not os.path.isdir(wheelhouse):
            raise SyncError(f"wheelhouse {wheelhouse} is not a directory")
        with open(os.path.join(env, "requirements.txt"), "wb") as handle:
            handle.write(content)  # what this environment was built from, for the admin
        # A venv without pip of its own: the host's pip installs into it (--python), so
        # the jail sees only the packages asked for, and no time goes into seeding pip.
        venv = os.path.join(env, "venv")
        run_step("creating the virtualenv", [HOST_PYTHON, "-m", "venv", "--without-pip", venv])
        python = os.path.join(venv, "bin", "python")
        pip = [HOST_PYTHON, "-m", "pip", "--python", python, *PIP_FLAGS]
        run_step("pip install", [*pip, "install", *PIP_INSTALL_FLAGS, *source])
        purelib = run_step(
            "locating site-packages",
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        ).strip()
        os.symlink(os.path.relpath(purelib, env), os.path.join(env, "site-packages"))

    env = build_and_switch(state_dir, "python", hashlib.sha256(content).hexdigest(), build, force)
    return os.path.realpath(os.path.join(env, "site-packages"))


def installed_python(site_packages: str | None) -> list[Dependency]:
    """Name and version of every distribution in the jail's site-packages."""
    if site_packages is None:
        return []
    found = {
        dist.metadata["Name"]: dist.version
        for dist in importlib.metadata.distributions(path=[site_packages])
    }
    return [Dependency(name, version) for name, version in sorted(found.items())]


# --- Node ------------------------------------------------------------------------------------


def sync_node(state_dir: str, package_json: str, offline: bool = False, force: bool = False) -> str:
    """npm install package_json's dependencies into a new node_modules and make it live.

    Returns the real path of the live node_modules. offline installs only from
    npm's cache. Skips when the live environment came from the same file content,
    unless force.
    """
    content = _read_source(package_json, "package.json")
    try:
        manifest = json.loads(content)
    except ValueError as error:
        raise SyncError(f"{package_json} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise SyncError(f"{package_json} must hold a JSON object (a package.json)")

    def build(env: str) -> None:
        with open(os.path.join(env, "package.json"), "wb") as handle:
            handle.write(content)
        flags = [*NPM_FLAGS, "--offline"] if offline else list(NPM_FLAGS)
        run_step("npm install", [NPM, "install", *flags], cwd=env)
        # npm creates no node_modules when there is nothing to install; the jail binds one.
        os.makedirs(os.path.join(env, "node_modules"), exist_ok=True)

    env = build_and_switch(state_dir, "node", hashlib.sha256(content).hexdigest(), build, force)
    return os.path.realpath(os.path.join(env, "node_modules"))


def installed_node(node_modules: str | None) -> list[Dependency]:
    """Name and version of every top-level package in node_modules (what require() finds)."""
    if node_modules is None:
        return []
    found: dict[str, str] = {}
    for name in os.listdir(node_modules):
        if name.startswith("."):  # .bin, .package-lock.json
            continue
        path = os.path.join(node_modules, name)
        if name.startswith("@") and os.path.isdir(path):
            packages = [os.path.join(path, scoped) for scoped in os.listdir(path)]
        else:
            packages = [path]
        for package in packages:
            try:
                with open(os.path.join(package, "package.json"), encoding="utf-8") as handle:
                    meta = json.load(handle)
            except (OSError, ValueError):
                continue  # not a package (a stray file or a broken install)
            if isinstance(meta, dict) and isinstance(meta.get("name"), str):
                found[meta["name"]] = str(meta.get("version", ""))
    return [Dependency(name, version) for name, version in sorted(found.items())]
