"""What a warm template costs every fork: fork + exit + wait of a plain interpreter
against one with the data-science modules imported (the jail's site-packages).

    python -m bench.forkcost --site-packages DIR [--rounds 300]

Each measurement runs in a fresh /usr/bin/python3 so neither inherits the other's heap.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from sandboxd.runtimes.datascience import ENVIRONMENT

_PROBE = """
import gc, os, statistics, sys, time
if sys.argv[1] == "warm":
    import numpy, pandas, matplotlib.pyplot
gc.freeze()
def once():
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return (time.perf_counter() - start) * 1000
samples = sorted(once() for _ in range(int(sys.argv[2])))
rss = next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]
print(f"{sys.argv[1]}: RSS {int(rss) / 1024:.1f} MiB, fork+exit+wait p50 "
      f"{statistics.median(samples):.3f} ms, p90 {samples[len(samples) * 9 // 10]:.3f} ms")
"""


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.forkcost", description=__doc__)
    parser.add_argument("--site-packages", required=True, metavar="DIR")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    env = {
        "PATH": "/usr/bin:/bin",
        **ENVIRONMENT,
        "MPLCONFIGDIR": "/tmp/sandboxd-forkcost-mpl",
        "PYTHONPATH": args.site_packages,
    }
    for kind in ("plain", "warm", "plain", "warm"):
        command = ["/usr/bin/python3", "-c", _PROBE, kind, str(args.rounds)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        sys.stdout.write(done.stdout or done.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
