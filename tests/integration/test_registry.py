"""A runtime defined only in a launcher (registry.register before main) is served by
a real daemon: the zygote gets it as data in the JailSpec and runs its jobs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon, start_daemon, stop_daemon

LAUNCHER = Path(__file__).with_name("registry_launcher.py")
REPO = Path(__file__).parents[2]

# Whether colorsys was imported before the code ran, then the import that gets the job
# claimed by the throwaway runtime (it claims jobs that import wave).
PROBE = "import sys\nwarm = 'colorsys' in sys.modules\nimport wave\nprint(warm, wave.__name__)\n"
PLAIN_PROBE = "import sys\nprint('colorsys' in sys.modules)\n"


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = start_daemon(
        tmp_path_factory.mktemp("registry"),
        "[python3]\npool_size = 2\n[nodejs]\npool_size = 1\n",
        env={"PYTHONPATH": str(REPO)},
        program=(sys.executable, str(LAUNCHER)),
    )
    yield daemon
    stop_daemon(daemon)


def test_a_runtime_registered_by_a_launcher_serves_the_jobs_it_claims(
    registered: Daemon,
) -> None:
    answer = registered.run(PROBE)
    assert answer["status"] == "ok", answer
    assert answer["stdout"] == "True wave\n"  # colorsys was warm: its template forked it
    registered.wait_for_log("python3+throwaway x1")


def test_the_plain_python3_runtime_still_serves_the_other_jobs(registered: Daemon) -> None:
    answer = registered.run(PLAIN_PROBE)
    assert answer["status"] == "ok", answer
    assert answer["stdout"] == "False\n"  # the plain zygote never imported colorsys
    registered.assert_healthy()


def test_the_registered_runtime_runs_in_the_same_jail(registered: Daemon) -> None:
    code = (
        "import os, wave\n"
        "print(os.getuid() != 0, os.path.exists('/etc/shadow'), open('/etc/hostname').read())\n"
    )
    answer = registered.run(code)
    assert answer["status"] == "ok", answer
    assert answer["stdout"] == "True False sandbox\n\n"
    blocked = registered.run("import wave, ctypes\nctypes.CDLL(None).syscall(101, 0, 0, 0, 0)\n")
    assert blocked["status"] == "blocked_syscall", blocked  # ptrace: the python3 policy
    assert os.path.isfile(LAUNCHER)
