"""forget_bootstrap() with a plan made before the fork (plan_forgetting) drops exactly
the modules that judging every module at job time drops: those loaded before the plan
by the plan, those loaded after it by their own judgement, and with fewer modules
than the plan counted every module is judged again."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig

from sandboxd import zygote

# Run in a fresh `python -I -S` like the zygote's: prints the modules a full judgement
# keeps, those forget_bootstrap() kept, and those `between` (run between plan and job)
# loaded.
PROGRAM = """
import json, sys
import sandboxd.runtimes.python3 as python3
from sandboxd.jail import RuntimeJail
runtime = RuntimeJail(
    runner="python3", seccomp_policy="python3", entries=[], environment=None,
    path={path!r}, packaged=[], warm_modules=[],
)
python3.plan_forgetting(runtime)
planned = set(sys.modules)
{between}
added = sorted(set(sys.modules) - planned)
expected = sorted(set(sys.modules) - set(python3._foreign(list(sys.modules), runtime)))
python3.forget_bootstrap(runtime)
print(json.dumps({{"expected": expected, "kept": sorted(sys.modules), "added": added}}))
"""

STDLIB = sysconfig.get_paths()["stdlib"]


def kept_after(between: str) -> tuple[list[str], list[str], list[str]]:
    code = PROGRAM.format(path=[STDLIB, STDLIB + "/lib-dynload"], between=between)
    boot = f"import sys; sys.path[:0] = {zygote.import_roots()!r}\n" + code
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", boot], capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout)
    return seen["expected"], seen["kept"], seen["added"]


def test_modules_loaded_after_the_plan_are_judged_too() -> None:
    expected, kept, added = kept_after("import fractions, sandboxd.metrics")
    assert {"fractions", "sandboxd.metrics"} <= set(added)
    assert kept == expected
    assert "fractions" in kept
    assert "sandboxd.metrics" not in kept
    assert not [name for name in kept if name.partition(".")[0] in zygote.BOOTSTRAP_PACKAGES]


def test_with_modules_removed_since_the_plan_every_module_is_judged() -> None:
    # One removed and more added: as many modules as planned or more, yet not the same.
    between = "del sys.modules['sandboxd.jail']\nimport sandboxd.metrics, fractions"
    expected, kept, added = kept_after(between)
    assert len(added) > 1 and "sandboxd.metrics" in added
    assert kept == expected
    assert "sandboxd.metrics" not in kept and "sandboxd" not in kept
