"""extra_syscalls and ALLOWED_SYSCALLS: they add to a language's allow-list, never replace it."""

from __future__ import annotations

from pathlib import Path

import pytest
from seccomp import Arch, resolve_syscall

from sandboxd.cli import main
from sandboxd.config import ConfigError, load_config
from sandboxd.jail import seccomp


def _load(tmp_path: Path, text: str, **environ: str) -> tuple[list[str], list[str]]:
    path = tmp_path / "sandboxd.toml"
    path.write_text(text)
    config = load_config(str(path), environ)
    return config.python3.extra_syscalls, config.nodejs.extra_syscalls


def _error(tmp_path: Path, text: str, **environ: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text, **environ)
    return str(caught.value)


def test_extra_syscalls_are_read_per_language(tmp_path: Path) -> None:
    text = '[python3]\nextra_syscalls = ["getpriority"]\n[nodejs]\nextra_syscalls = ["sysfs"]\n'
    assert _load(tmp_path, text) == (["getpriority"], ["sysfs"])


@pytest.mark.parametrize("name", ["ptrace", "bpf", "mount", "io_uring_setup", "setuid"])
def test_refused_call_is_an_error_naming_key_and_line(tmp_path: Path, name: str) -> None:
    message = _error(tmp_path, f'[python3]\npool_size = 1\nextra_syscalls = ["{name}"]\n')
    assert message.startswith(f"python3.extra_syscalls ({tmp_path}/sandboxd.toml:3): ")
    assert f"{name!r} is refused" in message


def test_unknown_name_is_an_error_naming_key_and_line(tmp_path: Path) -> None:
    message = _error(tmp_path, '[nodejs]\nextra_syscalls = ["getpriorty"]\n')
    assert message == (
        f"nodejs.extra_syscalls ({tmp_path}/sandboxd.toml:2): 'getpriorty' is no system call"
        " on x86_64 or aarch64"
    )


def test_allowed_syscalls_takes_numbers_and_names_for_both_languages(tmp_path: Path) -> None:
    number = resolve_syscall(Arch.NATIVE, "getpriority")
    text = '[python3]\nextra_syscalls = ["sysfs"]\n'
    python, node = _load(tmp_path, text, ALLOWED_SYSCALLS=f" {number}, sysfs ,")
    assert python == ["sysfs", "getpriority"]
    assert node == ["getpriority", "sysfs"]


def test_allowed_syscalls_refused_number_names_the_variable(tmp_path: Path) -> None:
    number = resolve_syscall(Arch.NATIVE, "ptrace")
    message = _error(tmp_path, "", ALLOWED_SYSCALLS=str(number))
    assert message.startswith("python3.extra_syscalls (environment variable ALLOWED_SYSCALLS)")
    assert "'ptrace' is refused" in message


def test_number_of_no_system_call_is_an_error(tmp_path: Path) -> None:
    assert "'99999' is no system call" in _error(tmp_path, "", ALLOWED_SYSCALLS="99999")


@pytest.mark.parametrize("language", ["python3", "nodejs"])
def test_extra_calls_add_to_the_allow_list_and_keep_every_rule(language: str) -> None:
    base = seccomp.policy_for(language)
    extended = seccomp.policy_for(language, ["getpriority", "ioctl", "read"])
    assert extended.allow == base.allow | {"getpriority"}
    assert extended.errno == base.errno
    assert extended.arg_rules == base.arg_rules  # ioctl keeps its argument rule
    seccomp.compile_policy(language, ["getpriority"])  # compiles


def test_check_prints_the_effective_lists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sandboxd.toml"
    path.write_text('[nodejs]\nextra_syscalls = ["getpriority"]\n')
    main(["check", "--config", str(path)])
    out = capsys.readouterr().out
    python = out.split("seccomp python3: ", 1)[1].split("seccomp nodejs: ", 1)[0]
    node = out.split("seccomp nodejs: ", 1)[1]
    assert "extra: -" in python and "getpriority" not in python
    assert node.startswith(f"{len(seccomp.policy_for('nodejs', ['getpriority']).allowed_names())}")
    assert "extra: getpriority" in node and " getpriority " in node
