"""User code sees only the standard library and the jail's environment (invariant 16).

The zygote runs without site (no .pth hooks, no venv site-packages) and each worker
drops its own bootstrap modules (sandboxd, msgspec, the seccomp bindings) before the
job runs. The checks compare against the stdlib directory and the jail's site dir.
"""

from __future__ import annotations

import json
import sys
import sysconfig

from sandboxd import debianpy
from sandboxd.runtimes.python3 import JAIL_SITE_PACKAGES
from tests.integration.conftest import Daemon

LIST_MODULES = """
import json, sys
found = {}
for name, module in list(sys.modules.items()):
    spec = getattr(module, "__spec__", None)
    found[name] = [getattr(module, "__file__", None), getattr(spec, "origin", None)]
print(json.dumps({"modules": found, "path": sys.path}))
"""


def run_json(daemon: Daemon, code: str) -> dict[str, object]:
    answer = daemon.run(code)
    assert answer["status"] == "ok", answer
    result: dict[str, object] = json.loads(answer["stdout"])
    return result


def test_a_run_starts_with_only_stdlib_and_jail_modules(daemon: Daemon) -> None:
    stdlib = sysconfig.get_paths()["stdlib"] + "/"
    seen = run_json(daemon, LIST_MODULES)
    modules = seen["modules"]
    assert isinstance(modules, dict)

    def trusted(name: str) -> bool:
        places = modules.get(name, [None, None])
        return (
            any(place.startswith((stdlib, JAIL_SITE_PACKAGES + "/")) for place in places if place)
            or places[1] in ("built-in", "frozen")
            or name in sys.builtin_module_names
        )

    # typing.io and the like: attributes of a trusted package, registered under its name
    foreign = {
        name: modules[name]
        for name in modules
        if name != "__main__" and not trusted(name) and not trusted(name.partition(".")[0])
    }
    assert foreign == {}, foreign
    for bootstrap in ("sandboxd", "sandboxd.zygote", "msgspec", "seccomp", "_distutils_hack"):
        assert bootstrap not in modules
    # Debian's jinja2/requests/httpx (debianpy) come last, behind the synced environment.
    assert seen["path"] == [
        stdlib.rstrip("/"),
        stdlib + "lib-dynload",
        JAIL_SITE_PACKAGES,
        debianpy.DIST_PACKAGES,
    ]


def test_the_daemons_packages_cannot_be_imported(daemon: Daemon) -> None:
    answer = daemon.run(
        "for name in ('sandboxd', 'msgspec', 'seccomp', 'trio', '_distutils_hack'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "        print('imported', name)\n"
        "    except ImportError:\n"
        "        print('absent', name)\n"
    )
    assert answer["status"] == "ok", answer
    assert all(line.startswith("absent ") for line in answer["stdout"].splitlines()), answer


def test_httpx_and_requests_find_the_jails_ca_bundle_offline(daemon: Daemon) -> None:
    seen = run_json(
        daemon,
        "import json, certifi, httpx, requests.certs\n"
        "httpx.Client().close()\n"
        "bundle = requests.certs.where()\n"
        "with open(bundle) as f:\n"
        "    head = f.read()\n"
        "print(json.dumps({'certifi': certifi.__file__, 'bundle': bundle,"
        " 'pem': 'BEGIN CERTIFICATE' in head}))\n",
    )
    assert str(seen["certifi"]).startswith(JAIL_SITE_PACKAGES + "/"), seen
    assert str(seen["bundle"]).startswith(JAIL_SITE_PACKAGES + "/"), seen
    assert seen["pem"] is True, seen


def test_the_builtins_site_adds_are_there_without_site(daemon: Daemon) -> None:
    answer = daemon.run("print(callable(help), callable(license))\nexit(4)")
    assert answer["status"] == "error" and answer["exit_code"] == 4, answer
    assert answer["stdout"] == "True True\n", answer
    assert daemon.run("quit()")["status"] == "ok"
