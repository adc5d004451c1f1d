"""The runtime registry: the spec is built by looping over its table, a job goes to
the first runtime of its language that claims it, and runtimes whose roots would be
the same share one root template."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec
import pytest

from sandboxd import profiles
from sandboxd.config import Config, PythonConfig, ServerConfig, pool_sizes
from sandboxd.daemon import build_spec
from sandboxd.jail import RuntimeJail
from sandboxd.runtimes import Runtime, datascience, nodejs, python3, registry


def profile(name: str, warm: list[str]) -> Runtime:
    """A python3 profile with warm modules of its own, claiming jobs that import them."""

    def jail(config: Config, built: Mapping[str, RuntimeJail]) -> RuntimeJail:
        return msgspec.structs.replace(built["python3"], warm_modules=warm, template=True)

    return Runtime(
        name=name,
        language="python3",
        runner="python3",
        seccomp_policy="python3",
        section="python3",
        jail=jail,
        pool_divisor=4,
        claims=lambda sources, runtime: profiles.imports_any(sources, runtime.warm_modules),
    )


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> list[Runtime]:
    """The registry's table, restored after the test."""
    copy = list(registry.RUNTIMES)
    monkeypatch.setattr(registry, "RUNTIMES", copy)
    return copy


def config(tmp_path: Path) -> Config:
    """No dependency environment (an empty state dir)."""
    return Config(server=ServerConfig(state_dir=str(tmp_path)), python3=PythonConfig(pool_size=8))


def test_the_table_is_python3_then_data_science_then_nodejs() -> None:
    assert registry.RUNTIMES[:3] == [python3.RUNTIME, datascience.RUNTIME, nodejs.RUNTIME]
    assert registry.plain("python3") is python3.RUNTIME
    assert registry.plain("nodejs") is nodejs.RUNTIME
    assert registry.plain("ruby") is None
    assert [r.name for r in registry.with_deps()] == ["python3", "nodejs"]


def test_a_runtime_name_is_registered_once(table: list[Runtime]) -> None:
    with pytest.raises(ValueError, match="registered already"):
        registry.register(python3.RUNTIME)


def test_the_spec_holds_every_served_runtime_with_its_records_policy(tmp_path: Path) -> None:
    spec, unavailable = build_spec(config(tmp_path), cgroups_in_force=False)
    python = spec.runtimes["python3"]
    assert (python.runner, python.seccomp_policy, python.root) == ("python3", "python3", "")
    assert "json" in python.warm_modules and not python.template
    assert python.environment is None
    assert ("nodejs" in spec.runtimes) != ("nodejs" in unavailable)
    # No synced environment: the data-science runtime comes from Debian's packages,
    # which CI installs (Makefile APT_PACKAGES), in a root of its own.
    science = spec.runtimes["science"]
    assert science.template and science.warm_modules == ["numpy", "pandas", "matplotlib.pyplot"]
    assert spec.root_name("science") == "science"
    assert "/usr/lib/python3/dist-packages/numpy" in science.packaged
    assert "/usr/lib/python3/dist-packages/numpy" not in python.packaged


def test_the_data_science_runtime_is_quietly_off_without_warm_modules(tmp_path: Path) -> None:
    server, python = ServerConfig(state_dir=str(tmp_path)), PythonConfig(warm_modules="")
    quiet = Config(server=server, python3=python)
    spec, unavailable = build_spec(quiet, cgroups_in_force=False)
    assert "science" not in spec.runtimes and "science" not in unavailable


def test_a_registered_profile_shares_the_python3_root_and_gets_its_own_pool(
    table: list[Runtime], tmp_path: Path
) -> None:
    registry.register(profile("first", ["wave"]))
    registry.register(profile("second", ["colorsys"]))
    spec, _ = build_spec(config(tmp_path), cgroups_in_force=False)
    first, second = spec.runtimes["first"], spec.runtimes["second"]
    assert (first.warm_modules, first.template) == (["wave"], True)
    assert second.warm_modules == ["colorsys"]
    assert spec.root_name("first") == spec.root_name("second") == "python3"
    assert first.entries == spec.runtimes["python3"].entries
    plan = pool_sizes(config(tmp_path), spec.runtimes, network=True)
    assert plan[("python3", False)] == 8 and plan[("first", False)] == 2
    assert plan[("first", True)] == 1 and plan[("second", False)] == 2


def test_a_job_goes_to_the_first_runtime_that_claims_it_else_to_the_plain_one(
    table: list[Runtime], tmp_path: Path
) -> None:
    registry.register(profile("first", ["wave"]))
    spec, _ = build_spec(config(tmp_path), cgroups_in_force=False)
    assert registry.choose("python3", ("", "import wave\n"), spec) == "first"
    assert registry.choose("python3", ("import wave", "print(1)"), spec) == "first"
    assert registry.choose("python3", ("", "print('import wave')\n"), spec) == "python3"
    assert registry.choose("nodejs", ("", "import wave\n"), spec) == "nodejs"
    assert registry.choose("ruby", ("", ""), spec) is None


def test_a_claiming_runtime_missing_from_the_spec_does_not_take_jobs(
    table: list[Runtime], tmp_path: Path
) -> None:
    spec, _ = build_spec(config(tmp_path), cgroups_in_force=False)
    registry.register(profile("late", ["wave"]))  # registered after the spec was built
    assert registry.choose("python3", ("", "import wave\n"), spec) == "python3"
