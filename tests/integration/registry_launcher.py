"""Test-only launcher: registers a throwaway runtime, then runs sandboxd's main.

The throwaway runtime is a second python3 profile: the plain python3 jail with a
warm-module list of its own (two pure-python stdlib modules), imported in a
template of its own, serving python3 jobs that import `wave`. Nothing of it exists
in sandboxd's files: this file and the registry's register() are all it takes, and
the zygote learns of it only through the JailSpec.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import msgspec

from sandboxd import cli, profiles
from sandboxd.config import Config
from sandboxd.jail import RuntimeJail
from sandboxd.runtimes import Runtime, registry

WARM = ["wave", "colorsys"]
CLAIMED_BY = ["wave"]


def jail(config: Config, built: Mapping[str, RuntimeJail]) -> RuntimeJail | None:
    python = built.get("python3")
    if python is None:
        return None
    return msgspec.structs.replace(python, warm_modules=WARM, template=True)


def claims(sources: tuple[str, ...], jail: RuntimeJail) -> bool:
    return profiles.imports_any(sources, CLAIMED_BY)


THROWAWAY = Runtime(
    name="throwaway",
    language="python3",
    runner="python3",
    seccomp_policy="python3",
    section="python3",
    jail=jail,
    pool_divisor=2,
    claims=claims,
)

if __name__ == "__main__":
    registry.register(THROWAWAY)
    sys.exit(cli.main(sys.argv[1:]))
