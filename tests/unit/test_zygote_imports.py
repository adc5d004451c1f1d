"""The zygote's import graph holds no registry, config or dependency machinery: it is
started `python -I -S`, learns every runtime from the JailSpec, and forks workers
whose memory should not carry pip, venv or the daemon's config code."""

from __future__ import annotations

import subprocess
import sys

from sandboxd import zygote

# What the zygote loads: its own module and the runners it imports at prepare().
LOADED = "import sandboxd.zygote, sandboxd.runtimes.python3, sandboxd.runtimes.nodejs"
KEPT_OUT = (
    "pip",
    "ensurepip",
    "venv",
    "importlib.metadata",
    "sandboxd.deps",
    "sandboxd.deps_cli",
    "sandboxd.config",
    "sandboxd.daemon",
    "sandboxd.runtimes.registry",
)


def modules_of_a_fresh_zygote_interpreter() -> set[str]:
    code = f"import sys; sys.path[:0] = {zygote.import_roots()!r}; {LOADED}; print(*sys.modules)"
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def test_the_zygote_imports_no_pip_config_or_registry() -> None:
    modules = modules_of_a_fresh_zygote_interpreter()
    assert "sandboxd.zygote" in modules and "sandboxd.runtimes.python3" in modules
    assert sorted(modules.intersection(KEPT_OUT)) == []
    assert not any(name.startswith(("pip.", "venv.", "ensurepip.")) for name in modules)
