"""Dependency environments built for real: pip from a wheelhouse made here (offline), a
failing sync that leaves the live environment serving, npm's lodash, and numpy and
pandas imported and used inside the python jail of a real daemon."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandboxd import deps
from sandboxd.jobs import Dependency
from tests.integration.conftest import Daemon, start_daemon, stop_daemon

PROBE = "sandboxd_probe"


def make_wheel(wheelhouse: Path, version: str) -> None:
    """A pure-python wheel of a one-module package, written directly (no build tools)."""
    dist_info = f"{PROBE}-{version}.dist-info"
    files = {
        f"{PROBE}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(wheelhouse / f"{PROBE}-{version}-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wheelhouse")
    make_wheel(path, "1.0")
    make_wheel(path, "2.0")
    return path


def requirements(directory: Path, *lines: str) -> str:
    path = directory / "requirements.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def import_probe(site_packages: str) -> str:
    """VERSION of the probe as the host's python3 imports it from site_packages alone."""
    code = f"import sys; sys.path[:0] = [{site_packages!r}]; import {PROBE}; print({PROBE}.VERSION)"
    return subprocess.run(
        [deps.HOST_PYTHON, "-I", "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_offline_sync_installs_from_a_wheelhouse(tmp_path: Path, wheelhouse: Path) -> None:
    state = str(tmp_path / "state")
    site = deps.sync_python(
        state, requirements(tmp_path, f"{PROBE}==1.0"), offline=True, wheelhouse=str(wheelhouse)
    )
    assert site == deps.live_python_site_packages(state) == os.path.realpath(site)
    # Only what was asked for: no pip or setuptools for the jail's code to find.
    assert deps.installed_python(site) == [Dependency(PROBE, "1.0")]
    assert import_probe(site) == "1.0"
    assert any(Path(site, PROBE, "__pycache__").glob("__init__.cpython-*.pyc"))
    for path in [Path(site), *Path(site).rglob("*")]:
        assert path.stat().st_mode & 0o022 == 0, f"{path} is writable by others"


def test_a_failed_sync_leaves_the_live_environment_serving(
    tmp_path: Path, wheelhouse: Path
) -> None:
    state = str(tmp_path / "state")
    live = deps.sync_python(
        state, requirements(tmp_path, f"{PROBE}==1.0"), offline=True, wheelhouse=str(wheelhouse)
    )
    with pytest.raises(deps.SyncError) as failure:
        deps.sync_python(
            state,
            requirements(tmp_path, "sandboxd-no-such-package-anywhere"),
            offline=True,
            wheelhouse=str(wheelhouse),
        )
    message = str(failure.value)
    assert message.startswith("pip install failed")
    assert "No matching distribution found for sandboxd-no-such-package-anywhere" in message
    assert deps.live_python_site_packages(state) == live
    assert import_probe(live) == "1.0"
    assert os.listdir(Path(state, "python", "envs")) == [os.path.basename(Path(live).parents[3])]


def test_readers_always_see_a_complete_environment_during_syncs(
    tmp_path: Path, wheelhouse: Path
) -> None:
    state = str(tmp_path / "state")

    def sync(version: str) -> str:
        return deps.sync_python(
            state,
            requirements(tmp_path, f"{PROBE}=={version}"),
            offline=True,
            wheelhouse=str(wheelhouse),
        )

    sync("1.0")
    seen: list[list[Dependency]] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            seen.append(deps.installed_python(deps.live_python_site_packages(state)))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in ("2.0", "1.0"):
            sync(version)
    finally:
        done.set()
        thread.join()
    assert seen
    complete = ([Dependency(PROBE, "1.0")], [Dependency(PROBE, "2.0")])
    assert all(found in complete for found in seen), {str(found) for found in seen}


def test_lodash_from_node_packages_json(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    package_json = tmp_path / "package.json"
    package_json.write_text(json.dumps({"private": True, "dependencies": {"lodash": "^4.17"}}))
    node_modules = deps.sync_node(state, str(package_json))
    assert node_modules == deps.live_node_modules(state)
    (lodash,) = deps.installed_node(node_modules)
    assert lodash.name == "lodash"
    assert lodash.version.startswith("4.")
    for path in [Path(node_modules), *Path(node_modules).rglob("*")]:
        assert path.lstat().st_mode & 0o022 == 0 or path.is_symlink(), f"{path} is writable"
    # What the node jail does: NODE_PATH names the live node_modules.
    out = subprocess.run(
        ["node", "-e", "console.log(require('lodash').chunk([1, 2, 3], 2).length)"],
        env={"NODE_PATH": node_modules, "PATH": "/usr/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "2\n"


# --- Inside the jail --------------------------------------------------------------------------

JAIL_REQUIREMENTS = ("numpy", "pandas", "jinja2")


def daemon_with_deps(
    base: Path, requirement_lines: list[str], node_dependencies: dict[str, str]
) -> Daemon:
    """A daemon whose state dir was synced from these files before it started; its
    [deps] names them, so the update route syncs from them too."""
    python_file = requirements(base, *requirement_lines)
    node_file = base / "package.json"
    node_file.write_text(json.dumps({"private": True, "dependencies": node_dependencies}))
    deps.sync_python(str(base / "state"), python_file)
    deps.sync_node(str(base / "state"), str(node_file))
    return start_daemon(
        base,
        f"[python3]\npool_size = 2\n[nodejs]\npool_size = 1\n"
        f'[deps]\npython_requirements = "{python_file}"\nnode_packages = "{node_file}"\n',
    )


def stop_cleanly(daemon: Daemon) -> None:
    stop_daemon(daemon)
    assert daemon.process.returncode == 0, daemon.log_path.read_text()


@pytest.fixture(scope="module")
def scientific(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """numpy, pandas and jinja2 for python3, lodash for nodejs."""
    base = tmp_path_factory.mktemp("scientific")
    running = daemon_with_deps(base, list(JAIL_REQUIREMENTS), {"lodash": "^4.17"})
    yield running
    stop_cleanly(running)


def ok(answer: dict[str, object]) -> str:
    assert answer["status"] == "ok", f"{answer['status']}: {answer['stderr']}"
    return str(answer["stdout"])


def test_numpy_matrix_product_with_threads_and_random(scientific: Daemon) -> None:
    code = """
import threading
import numpy as np
rng = np.random.default_rng(42)
a = rng.random((300, 300))
b = np.linalg.inv(a)
results = {}
def work(n):
    results[n] = np.allclose(a @ b, np.eye(300))
threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(sorted(results.items()), rng.integers(0, 10, size=3).shape)
"""
    assert (
        ok(scientific.run(code, timeout=30))
        == "[(0, True), (1, True), (2, True), (3, True)] (3,)\n"
    )


def test_pandas_dataframe_groupby(scientific: Daemon) -> None:
    code = """
import pandas as pd
frame = pd.DataFrame({"team": ["a", "b", "a", "b", "c"], "points": [1, 2, 3, 4, 5]})
print(frame.groupby("team")["points"].sum().to_dict())
"""
    assert ok(scientific.run(code, timeout=30)) == "{'a': 4, 'b': 6, 'c': 5}\n"


def test_jinja2_template_renders(scientific: Daemon) -> None:
    code = "import jinja2\nprint(jinja2.Template('{{ x | upper }}!').render(x='dify'))"
    assert ok(scientific.run(code)) == "DIFY!\n"


def test_listed_versions_are_the_ones_the_jail_imports(scientific: Daemon) -> None:
    listed = {
        d.name.lower(): d.version
        for d in deps.installed_python(deps.live_python_site_packages(scientific.state_dir))
    }
    code = "import numpy, pandas, jinja2\nfor m in numpy, pandas, jinja2: print(m.__version__)"
    seen = ok(scientific.run(code, timeout=30)).split()
    assert seen == [listed["numpy"], listed["pandas"], listed["jinja2"]]


def test_code_cannot_write_into_site_packages(scientific: Daemon) -> None:
    code = """
import os, numpy
site = os.path.dirname(os.path.dirname(numpy.__file__))
attempts = {
    "new file": lambda: open(os.path.join(site, "evil.py"), "w"),
    "overwrite": lambda: open(numpy.__file__, "a"),
    "mkdir": lambda: os.mkdir(os.path.join(site, "evil")),
    "remove": lambda: os.remove(numpy.__file__),
}
for name, attempt in attempts.items():
    try:
        attempt()
    except OSError as error:
        print(name, "refused:", error.strerror)
    else:
        print(name, "ALLOWED")
"""
    out = ok(scientific.run(code, timeout=30))
    # EACCES where the file's mode says no first (0644, root's), EROFS for the rest.
    refusals = {"Read-only file system", "Permission denied"}
    assert [line.partition(" refused: ")[2] in refusals for line in out.splitlines()] == [
        True
    ] * 4, out


def test_lodash_requires_in_the_node_jail(scientific: Daemon) -> None:
    code = "const _ = require('lodash'); console.log(_.chunk([1, 2, 3], 2).length, _.VERSION)"
    out = ok(scientific.run(code, language="nodejs"))
    (lodash,) = deps.installed_node(deps.live_node_modules(scientific.state_dir))
    assert out == f"2 {lodash.version}\n"


# --- The HTTP routes, on an environment built offline -----------------------------------------


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[Daemon]:
    """A daemon serving the probe package, its requirements file pointing at the wheelhouse."""
    base = tmp_path_factory.mktemp("probed")
    running = daemon_with_deps(base, offline_requirements(wheelhouse, "1.0"), {})
    yield running
    stop_cleanly(running)


def offline_requirements(wheelhouse: Path, version: str) -> list[str]:
    return ["--no-index", f"--find-links {wheelhouse}", f"{PROBE}=={version}"]


def dify(daemon: Daemon, route: str, language: str, update: bool = False) -> dict[str, object]:
    """GET route?language=..., or POST {"language": ...} with update; Dify's envelope."""
    headers = {"X-Api-Key": daemon.api_key}
    url = daemon.http_url + route
    if update:
        response = httpx.post(url, headers=headers, json={"language": language}, timeout=120)
    else:
        response = httpx.get(url, headers=headers, params={"language": language}, timeout=120)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_list_route_returns_the_installed_versions(probed: Daemon) -> None:
    answer = dify(probed, "/v1/sandbox/dependencies", "python3")
    assert answer["data"] == {"dependencies": [{"name": PROBE, "version": "1.0"}]}
    answer = dify(probed, "/v1/sandbox/dependencies", "nodejs")
    assert answer["data"] == {"dependencies": []}


def test_a_failed_update_returns_pips_error_and_runs_keep_working(
    probed: Daemon, wheelhouse: Path
) -> None:
    requirements_file = Path(probed.state_dir).parent / "requirements.txt"
    good = requirements_file.read_text()
    requirements_file.write_text("--no-index\nsandboxd-no-such-package-anywhere\n")
    try:
        answer = dify(probed, "/v1/sandbox/dependencies/update", "python3", update=True)
    finally:
        requirements_file.write_text(good)
    assert answer["code"] == -500
    assert "No matching distribution found for sandboxd-no-such-package-anywhere" in str(
        answer["message"]
    )
    assert ok(probed.run(f"import {PROBE}; print({PROBE}.VERSION)")) == "1.0\n"
    probed.assert_healthy()


def test_update_switches_environments_while_runs_keep_succeeding(
    probed: Daemon, wheelhouse: Path
) -> None:
    requirements(Path(probed.state_dir).parent, *offline_requirements(wheelhouse, "2.0"))
    seen: list[tuple[object, object]] = []
    updated = threading.Event()

    def load() -> None:
        while not updated.is_set():
            answer = probed.run(f"import {PROBE}; print({PROBE}.VERSION)")
            seen.append((answer["status"], answer["stdout"]))

    runners = [threading.Thread(target=load) for _ in range(2)]
    for runner in runners:
        runner.start()
    try:
        answer = dify(probed, "/v1/sandbox/dependencies/update", "python3", update=True)
    finally:
        updated.set()
        for runner in runners:
            runner.join()
    assert answer == {"code": 0, "message": "success", "data": {}}
    assert seen
    assert set(seen) <= {("ok", "1.0\n"), ("ok", "2.0\n")}, set(seen)
    # Every run admitted after the update returned sees the new environment.
    assert ok(probed.run(f"import {PROBE}; print({PROBE}.VERSION)")) == "2.0\n"
    answer = dify(probed, "/v1/sandbox/dependencies", "python3")
    assert answer["data"] == {"dependencies": [{"name": PROBE, "version": "2.0"}]}
