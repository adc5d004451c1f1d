"""Red team: what two runs of the data-science template share (DESIGN.md invariant 15).

Every run of that pool is a fresh fork of one warm template process (numpy, pandas,
matplotlib imported): whatever state the template had at fork time, every run
starts with. Two runs at once (tenants.run_together) print the state a run cannot
choose: numpy's global random generator, Python's `random`, the str hash seed, the
address-space layout; each is then compared between the two runs.
"""

from __future__ import annotations

import re

from tests.integration.conftest import Daemon
from tests.integration.tenants import Tenant, run_together
from tests.integration.test_datascience import science  # noqa: F401 (a fixture)

STATE = """
import random, numpy, pandas, matplotlib
import ctypes, time
time.sleep(0.5)  # both runs alive at once
print("STATE numpy", numpy.random.random(4).tolist())
print("STATE random", random.random())
print("STATE hash", hash("sandboxd"))
print("STATE heap", hex(id(object())))
print("STATE libc", hex(ctypes.cast(ctypes.CDLL(None).printf, ctypes.c_void_p).value))
"""


def _state(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^STATE (\w+) (.*)$", stdout, re.MULTILINE))


def test_two_template_runs_share_no_random_state(
    science: Daemon,  # noqa: F811 (the fixture imported above)
) -> None:
    first, second = (
        _state(answer.stdout)
        for answer in run_together(science, Tenant("python3", STATE), Tenant("python3", STATE))
    )
    assert first.keys() == {"numpy", "random", "hash", "heap", "libc"}, first
    same = {name for name in first if first[name] == second[name]}
    # numpy and random are reseeded in each worker (runtimes/template.py, RESEED_AFTER_FORK).
    # The hash seed and the address-space layout are those of the process forked from,
    # as in every fork server (the plain pool's zygote too): known, and not a channel.
    assert same <= {"hash", "heap", "libc"}, (same, first, second)
