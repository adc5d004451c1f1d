"""The host scans behind a generation's jail roots are done once per daemon process:
repeated while the host is unchanged they answer from memory, and a package installed
or removed (dpkg's status rewritten), a file changed or a path gone is scanned again."""

from __future__ import annotations

import os
import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

from sandboxd import daemon, debianpy
from sandboxd.config import Config
from sandboxd.jail import hostscan, rootfs


class FakeDpkg:
    """dpkg-query over a table of installed packages, counting the questions."""

    def __init__(self, status: Path) -> None:
        self.status = status
        # package -> (Depends, paths it owns)
        self.installed: dict[str, tuple[str, list[str]]] = {}
        self.queries = 0

    def query(self, *args: str) -> str:
        self.queries += 1
        if args[0] == "-W":
            names = args[3:]
            rows = [(n, self.installed[n][0]) for n in names if n in self.installed]
            return "".join(f"{name}\tii \t{depends}\n" for name, depends in rows)
        assert args[0] == "-L"
        return "".join(f"{path}\n" for n in args[1:] for path in self.installed[n][1])

    def change(self, package: str, depends: str = "", owns: list[str] | None = None) -> None:
        """apt install (owns given) or remove (None): the table, then dpkg's status file,
        rewritten by a rename as dpkg does."""
        if owns is None:
            del self.installed[package]
        else:
            self.installed[package] = (depends, owns)
        new = self.status.with_suffix(".new")
        new.write_text("".join(f"Package: {name}\n\n" for name in sorted(self.installed)))
        new.replace(self.status)


@pytest.fixture
def dpkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDpkg:
    dist = tmp_path / "dist-packages"
    dist.mkdir()
    fake = FakeDpkg(tmp_path / "status")
    fake.status.write_text("")
    monkeypatch.setattr(hostscan, "DPKG_STATUS", str(fake.status))
    monkeypatch.setattr(debianpy, "DIST_PACKAGES", str(dist))
    monkeypatch.setattr(debianpy, "_dpkg_query", fake.query)
    monkeypatch.setitem(debianpy.PROFILES, "fake", ("python3-alpha",))
    return fake


def _package(dpkg: FakeDpkg, name: str, depends: str = "") -> str:
    """Install package python3-<name> owning <dist-packages>/<name>/__init__.py."""
    top = Path(debianpy.DIST_PACKAGES, name)
    top.mkdir()
    (top / "__init__.py").write_text("")
    dpkg.change(f"python3-{name}", depends, [str(top), str(top / "__init__.py")])
    return str(top)


def _paths() -> list[str]:
    return [entry.path for entry in debianpy.root_entries("fake")]


def test_a_reload_without_package_changes_asks_dpkg_nothing(dpkg: FakeDpkg) -> None:
    alpha = _package(dpkg, "alpha")
    assert _paths() == [alpha]
    asked = dpkg.queries
    assert _paths() == [alpha]
    assert dpkg.queries == asked


def test_an_installed_or_removed_package_is_seen_on_the_next_scan(dpkg: FakeDpkg) -> None:
    alpha = _package(dpkg, "alpha")
    assert _paths() == [alpha]
    beta = _package(dpkg, "beta")  # apt install python3-beta
    dpkg.change("python3-alpha", "python3-beta", dpkg.installed["python3-alpha"][1])
    assert _paths() == [alpha, beta]
    dpkg.change("python3-alpha", "", dpkg.installed["python3-alpha"][1])
    dpkg.change("python3-beta")  # apt remove python3-beta
    Path(beta, "__init__.py").unlink()
    Path(beta).rmdir()
    assert _paths() == [alpha]


def test_a_path_removed_behind_dpkgs_back_is_scanned_again(dpkg: FakeDpkg) -> None:
    alpha = _package(dpkg, "alpha")
    assert _paths() == [alpha]
    Path(alpha, "__init__.py").unlink()
    Path(alpha).rmdir()
    assert _paths() == []  # no bind of a missing path, which would fail the root


def test_callers_get_a_copy_they_may_extend(dpkg: FakeDpkg) -> None:
    alpha = _package(dpkg, "alpha")
    _paths().append("/elsewhere")
    debianpy.root_entries("fake").clear()
    assert _paths() == [alpha]


class Names:
    """A per-file scan that reads, from each file, the files it names (one a line)."""

    def __init__(self) -> None:
        self.scanned: list[str] = []

    def __call__(self, files: list[str]) -> dict[str, frozenset[str]]:
        self.scanned += files
        return {path: frozenset(Path(path).read_text().split()) for path in files}


def test_per_file_answers_are_kept_until_the_file_or_what_it_names_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = tmp_path / "ld.so.cache"
    loader.write_text("1")
    monkeypatch.setattr(hostscan, "LOADER_CACHE", str(loader))
    library, module, other = tmp_path / "libx.so", tmp_path / "mod.so", tmp_path / "other.so"
    library.write_text("")
    module.write_text(f"{library}\n")
    other.write_text("")
    scan = Names()
    cached = hostscan.PerFile(scan)
    files = [str(module), str(other), str(tmp_path / "missing.so")]
    expected = {str(module): frozenset({str(library)}), str(other): frozenset()}
    assert cached(files) == expected
    assert cached(files) == expected
    assert scan.scanned == [str(module), str(other)]
    library.write_text("upgraded, with a new dependency")  # what module.so links changed
    assert cached(files) == expected
    assert scan.scanned[2:] == [str(module)]
    os.utime(other, ns=(0, 0))  # the file itself changed
    assert cached(files) == expected
    assert scan.scanned[3:] == [str(other)]
    loader.write_text("22")  # ldconfig: a library may now be found elsewhere
    assert cached(files) == expected
    assert scan.scanned[4:] == [str(module), str(other)]


def test_ldd_output_is_split_per_file() -> None:
    out = (
        "/a/one.so:\n"
        "\tlinux-vdso.so.1 (0x00007f0000000000)\n"
        "\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f0000001000)\n"
        "/a/not-elf.so:\n"
        "/a/two.so:\n"
        "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0000002000)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f0000003000)\n"
    )
    assert rootfs._ldd_answers(["/a/one.so", "/a/not-elf.so", "/a/two.so"], out) == {
        "/a/one.so": frozenset({"/lib/x86_64-linux-gnu/libm.so.6"}),
        "/a/not-elf.so": frozenset(),
        "/a/two.so": frozenset({"/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"}),
    }
    single = "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0000002000)\n"
    assert rootfs._ldd_answers(["/a/one.so"], single) == {
        "/a/one.so": frozenset({"/lib/x86_64-linux-gnu/libc.so.6"})
    }


def test_ldd_split_over_cpus_finds_what_one_ldd_of_all_files_finds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dynload = os.path.join(sysconfig.get_paths()["stdlib"], "lib-dynload")
    modules = sorted(os.path.join(dynload, name) for name in os.listdir(dynload))
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    out = subprocess.run(
        ["ldd", *modules], capture_output=True, text=True, check=False, env={"LC_ALL": "C"}
    ).stdout
    whole = {m[1] for m in re.finditer(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)", out)}
    assert whole and set().union(*rootfs._ldd(modules).values()) == whole


def test_a_second_generation_on_an_unchanged_host_runs_no_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The host held still: what another process does to dpkg's status or the loader's
    # cache meanwhile (a make deb beside this suite ran apt) must not count as a change.
    host = hostscan.packages()
    monkeypatch.setattr(hostscan, "packages", lambda: host)
    config = Config()
    first = daemon.build_spec(config, False)

    def refuse(args: list[str], *_: object, **__: object) -> None:
        raise AssertionError(f"a reload ran {args[0]}")

    monkeypatch.setattr(subprocess, "run", refuse)  # dpkg-query
    monkeypatch.setattr(subprocess, "Popen", refuse)  # ldd
    assert daemon.build_spec(config, False) == first
