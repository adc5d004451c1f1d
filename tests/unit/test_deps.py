"""Dependency environments without installers: the layout, the atomic switch, garbage
collection, the unchanged-file skip, and reading what is installed from package metadata."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from sandboxd import deps, deps_cli
from sandboxd.config import Config, DepsConfig, ServerConfig
from sandboxd.jobs import Dependency

REPO = Path(__file__).parents[2]


def fake_site_packages(env: str, packages: dict[str, str]) -> None:
    """What a python build leaves: site-packages with a dist-info per package."""
    site = Path(env, "venv", "lib", "python3", "site-packages")
    for name, version in packages.items():
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    site.mkdir(parents=True, exist_ok=True)
    os.symlink("venv/lib/python3/site-packages", os.path.join(env, "site-packages"))


def build_python(state: Path, digest: str, force: bool = False, **packages: str) -> str:
    return deps.build_and_switch(
        str(state), "python", digest, lambda env: fake_site_packages(env, packages), force
    )


def env_ids(state: Path) -> list[str]:
    return sorted(os.listdir(state / "python" / "envs"))


def link(state: Path, name: str) -> str:
    return os.path.basename(os.readlink(state / "python" / name))


def test_nothing_is_live_before_the_first_sync(tmp_path: Path) -> None:
    assert deps.live_python_site_packages(str(tmp_path)) is None
    assert deps.live_node_modules(str(tmp_path)) is None
    assert deps.installed_python(None) == []
    assert deps.installed_node(None) == []


def test_a_build_becomes_live_and_its_site_packages_is_a_real_path(tmp_path: Path) -> None:
    env = build_python(tmp_path, "a", jinja2="3.1.6")
    assert env == os.path.realpath(env)
    assert link(tmp_path, "current") == os.path.basename(env)
    site = deps.live_python_site_packages(str(tmp_path))
    assert site == os.path.join(env, "venv", "lib", "python3", "site-packages")
    assert site == os.path.realpath(site)  # the jail binds it and puts it on sys.path as is
    assert deps.installed_python(site) == [Dependency("jinja2", "3.1.6")]
    assert deps.live_digest(str(tmp_path), "python") == "a"


def test_a_new_build_switches_current_and_keeps_the_old_one_as_previous(tmp_path: Path) -> None:
    first = build_python(tmp_path, "a", jinja2="3.1.5")
    second = build_python(tmp_path, "b", jinja2="3.1.6")
    assert link(tmp_path, "current") == os.path.basename(second)
    assert link(tmp_path, "previous") == os.path.basename(first)
    assert deps.installed_python(deps.live_python_site_packages(str(tmp_path))) == [
        Dependency("jinja2", "3.1.6")
    ]
    assert not [name for name in os.listdir(tmp_path / "python") if name.startswith(".current")]


def test_only_the_live_and_previous_environments_are_kept(tmp_path: Path) -> None:
    envs = [os.path.basename(build_python(tmp_path, digest)) for digest in "abcd"]
    assert env_ids(tmp_path) == sorted(envs[-2:])


def test_an_environment_still_mounted_in_a_jail_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oldest = os.path.basename(build_python(tmp_path, "a"))
    # As /proc/<zygote>/mountinfo shows a bind of its site-packages: relative to its fs.
    mounted = {"/", f"/state/python/envs/{oldest}/venv/lib/python3/site-packages"}
    monkeypatch.setattr(deps, "mounted_roots", lambda: mounted)
    build_python(tmp_path, "b")
    build_python(tmp_path, "c")
    assert oldest in env_ids(tmp_path)
    monkeypatch.setattr(deps, "mounted_roots", lambda: {"/"})
    build_python(tmp_path, "d")
    assert oldest not in env_ids(tmp_path)


def test_mounted_roots_sees_this_process_root_mount() -> None:
    assert "/" in deps.mounted_roots()


def test_an_unchanged_source_skips_the_build_unless_forced(tmp_path: Path) -> None:
    live = build_python(tmp_path, "same")

    def must_not_build(env: str) -> None:
        raise AssertionError("built although the source is unchanged")

    assert deps.build_and_switch(str(tmp_path), "python", "same", must_not_build, False) == live
    forced = build_python(tmp_path, "same", force=True)
    assert forced != live
    assert link(tmp_path, "current") == os.path.basename(forced)


def test_a_failed_build_leaves_the_live_environment_and_no_leftovers(tmp_path: Path) -> None:
    live = build_python(tmp_path, "a", jinja2="3.1.6")

    def broken(env: str) -> None:
        Path(env, "half-installed").write_text("")
        raise deps.SyncError("pip install failed: no such package")

    with pytest.raises(deps.SyncError, match="no such package"):
        deps.build_and_switch(str(tmp_path), "python", "b", broken, False)
    assert link(tmp_path, "current") == os.path.basename(live)
    assert env_ids(tmp_path) == [os.path.basename(live)]


def test_an_unusable_state_dir_is_a_sync_error(tmp_path: Path) -> None:
    (tmp_path / "python").write_text("a file where the python environments should be")
    with pytest.raises(deps.SyncError, match=r"cannot update the environments in .*/python"):
        build_python(tmp_path, "a")


def test_environments_are_writable_by_root_only(tmp_path: Path) -> None:
    top = tmp_path / "env"
    (top / "pkg").mkdir(parents=True)
    os.chmod(top / "pkg", 0o777)
    (top / "pkg" / "mod.py").write_text("")
    os.chmod(top / "pkg" / "mod.py", 0o666)
    (top / "pkg" / "private.so").write_text("")
    os.chmod(top / "pkg" / "private.so", 0o700)
    (top / "pkg" / "link").symlink_to("mod.py")
    deps.make_read_only(str(top))
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in [top, *top.rglob("*")]}
    assert modes["env"] == modes["pkg"] == 0o755
    assert modes["mod.py"] == 0o644
    assert modes["private.so"] == 0o755  # readable by the jail's uids, who need to load it


def test_installed_python_reads_names_and_versions_from_dist_info(tmp_path: Path) -> None:
    fake_site_packages(str(tmp_path), {"requests": "2.32.3", "Jinja2": "3.1.6"})
    assert deps.installed_python(str(tmp_path / "site-packages")) == [
        Dependency("Jinja2", "3.1.6"),
        Dependency("requests", "2.32.3"),
    ]


def write_package(node_modules: Path, name: str, version: str) -> None:
    (node_modules / name).mkdir(parents=True)
    (node_modules / name / "package.json").write_text(
        json.dumps({"name": name, "version": version})
    )


def test_installed_node_lists_top_level_and_scoped_packages(tmp_path: Path) -> None:
    write_package(tmp_path, "lodash", "4.17.21")
    write_package(tmp_path, "@types/node", "20.1.0")
    write_package(tmp_path, "lodash/node_modules/nested", "1.0.0")  # not require()able by name
    (tmp_path / ".bin").mkdir()
    (tmp_path / ".package-lock.json").write_text("{}")
    (tmp_path / "not-a-package").mkdir()
    assert deps.installed_node(str(tmp_path)) == [
        Dependency("@types/node", "20.1.0"),
        Dependency("lodash", "4.17.21"),
    ]


def test_installer_failure_quotes_the_last_lines_of_its_output() -> None:
    noisy = "import sys\nfor i in range(100): print('line', i, file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(deps.SyncError) as failure:
        deps.run_step("pip install", [sys.executable, "-c", noisy])
    message = str(failure.value)
    assert message.startswith("pip install failed (exit status 3):")
    assert "line 99" in message
    assert "line 50\n" not in message


def test_a_missing_host_pip_gets_a_hint() -> None:
    # -S: no site-packages, so no pip, as on a host without python3-pip.
    with pytest.raises(deps.SyncError, match=r"(?m)^hint: install the host's pip"):
        deps.run_step("pip install", [sys.executable, "-I", "-S", "-m", "pip"])


def test_a_missing_installer_is_a_sync_error() -> None:
    with pytest.raises(deps.SyncError, match="not installed on this host"):
        deps.run_step("npm install", ["/nonexistent/npm", "install"])


def test_sync_errors_for_bad_sources_leave_no_environment(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(deps.SyncError, match="cannot read the requirements file"):
        deps.sync_python(str(state), str(tmp_path / "missing.txt"))
    assert not state.exists()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("jinja2\n")
    with pytest.raises(deps.SyncError, match="needs a wheelhouse"):
        deps.sync_python(str(state), str(requirements), offline=True)
    assert deps.live_env(str(state), "python") is None
    assert os.listdir(state / "python" / "envs") == []
    package_json = tmp_path / "package.json"
    package_json.write_text("{not json")
    with pytest.raises(deps.SyncError, match="not valid JSON"):
        deps.sync_node(str(state), str(package_json))
    assert not (state / "node").exists()


def test_shipped_package_files_parse() -> None:
    etc = REPO / "etc" / "sandboxd"
    manifest = json.loads((etc / "node-packages.json").read_text())
    assert manifest["dependencies"] == {}
    requirements = (etc / "python-requirements.txt").read_text().splitlines()
    names = {line.split(">")[0] for line in requirements if line and not line.startswith("#")}
    assert names == {"jinja2", "requests", "httpx"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sandboxd")
    deps_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_deps_list_json_prints_the_live_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_python(tmp_path, "a", httpx="0.28.1")
    args = parse("deps", "list", "--json", "--state-dir", str(tmp_path))
    assert deps_cli.run(args, Config()) == 0
    assert json.loads(capsys.readouterr().out) == {
        "python3": [{"name": "httpx", "version": "0.28.1"}],
        "nodejs": [],
    }


def test_deps_sync_reports_a_failure_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = Config(
        server=ServerConfig(state_dir=str(tmp_path)),
        deps=DepsConfig(python_requirements=str(tmp_path / "missing.txt")),
    )
    assert deps_cli.run(parse("deps", "sync", "--language", "python3"), config) == 1
    err = capsys.readouterr().err
    assert "python3: cannot read the requirements file" in err
    assert "the live environment is unchanged" in err


def test_deps_sync_options_parse() -> None:
    args = parse("deps", "sync", "--language", "python3", "--offline", "--wheelhouse", "w")
    assert (args.deps_command, args.language, args.offline, args.wheelhouse, args.force) == (
        "sync",
        "python3",
        True,
        "w",
        False,
    )
