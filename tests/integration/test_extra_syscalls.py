"""An admin's extra_syscalls reach the compiled filter: the added call works, others kill."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import Daemon, start_daemon, stop_daemon

# getpriority is in no allow-list: without the addition it kills the run (SIGSYS).
PYTHON_GETPRIORITY = "import os; print('nice', os.getpriority(os.PRIO_PROCESS, 0))"
NODE_GETPRIORITY = "console.log('nice', require('os').getPriority())"
# sched_getparam is in no allow-list and not added: still a kill.
PYTHON_SCHED_GETPARAM = "import os; print(os.sched_getparam(0))"


@pytest.fixture(scope="module")
def extended(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = start_daemon(
        tmp_path_factory.mktemp("extra-syscalls"),
        '[python3]\nextra_syscalls = ["getpriority"]\n',
        env={"ALLOWED_SYSCALLS": "getpriority"},  # the dify name, for nodejs here
    )
    yield running
    stop_daemon(running)


def test_added_call_is_killed_without_the_addition(daemon: Daemon) -> None:
    assert daemon.run(PYTHON_GETPRIORITY)["status"] == "blocked_syscall"
    assert daemon.run(NODE_GETPRIORITY, "nodejs")["status"] == "blocked_syscall"


@pytest.mark.parametrize(
    ("language", "code"), [("python3", PYTHON_GETPRIORITY), ("nodejs", NODE_GETPRIORITY)]
)
def test_added_call_works_in_a_real_run(extended: Daemon, language: str, code: str) -> None:
    answer = extended.run(code, language)
    assert answer["status"] == "ok", answer
    assert answer["stdout"].startswith("nice ")


def test_addition_does_not_replace_the_list(extended: Daemon) -> None:
    assert extended.run(PYTHON_SCHED_GETPARAM)["status"] == "blocked_syscall"
    ptrace = "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0); print('MARKER')"
    answer = extended.run(ptrace)
    assert answer["status"] == "blocked_syscall"
    assert "MARKER" not in answer["stdout"]
    extended.assert_healthy()
