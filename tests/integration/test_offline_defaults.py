"""Offline defaults: Debian's jinja2, requests and httpx in the jail with nothing synced,
and nothing else of the host's dist-packages; Debian's numpy, pandas and matplotlib in
the data-science pools only, which start only when their warm modules are installed.
(tests/integration/test_datascience.py runs the data-science tests on Debian's alone.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd import debianpy
from tests.integration.conftest import Daemon, start_daemon, stop_daemon
from tests.integration.test_http_daemon import (
    dify_outcome,
    dify_run,
    extract_result,
    jinja2_template,
)

DEFAULT_IMPORTS = ("jinja2", "requests", "httpx")
# Daemon-side packages in the host's dist-packages that a run must not reach.
HOST_ONLY = ("pystemd", "seccomp", "apt", "yaml", "cryptography")

WHERE_FROM = (
    "import importlib, json\n"
    f"print(json.dumps({{n: importlib.import_module(n).__file__ for n in {DEFAULT_IMPORTS!r}}}))\n"
)


@pytest.fixture(scope="module")
def unsynced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon whose state dir is empty: no `sandboxd deps sync` ever ran."""
    base = tmp_path_factory.mktemp("unsynced")
    state = base / "empty-state"
    state.mkdir()
    running = start_daemon(base, "[python3]\npool_size = 2\n", state_dir=str(state))
    yield running
    stop_daemon(running)


def _files(answer: dict[str, object]) -> dict[str, str]:
    assert answer["status"] == "ok", answer
    files: dict[str, str] = json.loads(str(answer["stdout"]))
    return files


def test_debian_packages_are_installed_on_this_host() -> None:
    closure = debianpy.installed_closure(debianpy.PROFILES["python3"])
    assert set(debianpy.PROFILES["python3"]) <= set(closure), "apt install them (make apt)"


def test_debian_science_packages_are_installed_on_this_host() -> None:
    closure = debianpy.installed_closure(debianpy.PROFILES["science"])
    assert set(debianpy.PROFILES["science"]) <= set(closure), "apt install them (make apt)"


def test_jinja2_requests_httpx_import_with_an_empty_state_dir(unsynced: Daemon) -> None:
    files = _files(unsynced.run(WHERE_FROM))
    for name in DEFAULT_IMPORTS:
        assert files[name].startswith(f"{debianpy.DIST_PACKAGES}/{name}/"), files


def test_difys_jinja2_template_works_offline(unsynced: Daemon) -> None:
    code = jinja2_template("{{ a }}+{{ b }}={{ a + b }}", {"a": 2, "b": 3})
    assert extract_result(dify_outcome(dify_run(unsynced, code))) == "2+3=5"


def test_the_rest_of_dist_packages_is_not_in_the_jail(unsynced: Daemon) -> None:
    # A real import: the zygote's own seccomp bindings live in dist-packages too, and
    # must be neither left in sys.modules nor findable on the path.
    probe = (
        "import importlib, os\n"
        f"for name in {HOST_ONLY!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        print('MARKER', name)\n"
        "    except ImportError:\n"
        "        pass\n"
        f"print(sorted(os.listdir({debianpy.DIST_PACKAGES!r})))\n"
    )
    answer = unsynced.run(probe)
    assert answer["status"] == "ok", answer
    assert "MARKER" not in answer["stdout"]
    closure = debianpy.installed_closure(debianpy.PROFILES["python3"])
    expected = sorted(Path(p).name for p in debianpy.owned_top_level(closure))
    assert answer["stdout"] == f"{expected}\n"
    unsynced.assert_healthy()


def test_a_synced_environment_comes_first(daemon: Daemon) -> None:
    # The shared daemon's state dir holds a `deps sync` of the default requirements.
    files = _files(daemon.run(WHERE_FROM))
    for name in DEFAULT_IMPORTS:
        assert files[name].startswith(f"/opt/sandboxd/python/{name}/"), files


SCIENCE_IMPORTS = ("numpy", "pandas", "matplotlib", "PIL", "scipy")


def test_science_packages_are_not_in_a_plain_jail(unsynced: Daemon) -> None:
    # Names the import scan cannot see, so the run goes to the plain pool, whose root
    # holds the python3 profile alone; Debian's numpy is bound into data-science roots.
    probe = (
        "import importlib, os, sys\n"
        f"names = {SCIENCE_IMPORTS!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in names))\n"
        "for name in names:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        print('MARKER', name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "print(os.path.exists('/usr/share/matplotlib'))\n"
    )
    answer = unsynced.run(probe)
    assert answer["status"] == "ok", answer
    assert "MARKER" not in answer["stdout"]
    assert answer["stdout"] == "[]\nFalse\n"
    unsynced.assert_healthy()


def test_the_science_pool_starts_on_debians_packages_alone(unsynced: Daemon) -> None:
    unsynced.wait_for_log("sandboxd ready:")
    [ready] = [line for line in unsynced.log_path.read_text().splitlines() if "ready:" in line]
    assert "python3+science" in ready, ready
    answer = unsynced.run("import numpy\nprint(numpy.__file__)")
    assert answer["stdout"] == f"{debianpy.DIST_PACKAGES}/numpy/__init__.py\n", answer


def test_no_science_pool_when_no_warm_module_is_installed(tmp_path: Path) -> None:
    state = tmp_path / "empty-state"
    state.mkdir()
    config = '[python3]\npool_size = 1\nwarm_modules = "sandboxd_no_such_module"\n'
    running = start_daemon(tmp_path, config, state_dir=str(state))
    try:
        running.wait_for_log("sandboxd ready:")
        log = running.log_path.read_text()
        [ready] = [line for line in log.splitlines() if "ready:" in line]
        assert "+science" not in ready, ready
        assert "template" not in log, log
        answer = running.run("import sandboxd_no_such_module")
        assert answer["status"] == "error" and "ModuleNotFoundError" in answer["stderr"]
        running.assert_healthy()
    finally:
        stop_daemon(running)
