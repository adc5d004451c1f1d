"""sandboxd's system test: install the .deb on a Debian 12 guest and use it.

    python3 tests/system/harness.py --deb build/sandboxd_<ver>_<arch>.deb

Stages, each timed: the image (cached under --cache, built on a miss), the
payload disk (.deb + checks.sh), the boot and the checks (tests/system/checks.sh
runs inside the guest as a user would and reports one line per step). Exits
non-zero if any check fails, the guest reports nothing, or it runs past the
timeout; the guest's journal and boot console are kept in --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import image
import vm

HERE = Path(__file__).resolve().parent
TOOLS = ("debootstrap", "mke2fs", "qemu-system-x86_64", "qemu-img")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--deb", type=Path, required=True, help="the package to install")
    parser.add_argument("--cache", type=Path, default=Path("/var/cache/sandboxd-systemtest"))
    parser.add_argument("--out", type=Path, default=HERE.parents[1] / "build" / "systemtest")
    parser.add_argument("--checks", type=Path, default=HERE / "checks.sh")
    parser.add_argument(
        "--only", default="", help="run only checks whose group is in this comma-separated list"
    )
    # Boot and every check take ~16 min under TCG on a loaded 2-core host (install
    # alone ~2 min): the bound leaves room, inside CI's 90 min for make test too.
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for boot + checks")
    args = parser.parse_args()

    if os.geteuid() != 0:
        return fail("must run as root (debootstrap, mke2fs -d of a root file system)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return fail(f"missing tools: {' '.join(missing)} (make systemtest-deps installs them)")
    if not args.deb.is_file():
        return fail(f"no package at {args.deb} (make deb builds it)")
    args.out.mkdir(parents=True, exist_ok=True)
    run = vm.Run(args.out)
    timings: list[tuple[str, float]] = []

    started = time.monotonic()
    build_log = args.out / "image-build.log"
    print(f"== image (cache {args.cache}; a miss builds it, log in {build_log})", flush=True)
    built_image, built = image.ensure(args.cache, build_log)
    timings.append(("image " + ("built, cold cache" if built else "cached"), since(started)))

    started = time.monotonic()
    settings = args.out / "checks.env"
    settings.write_text(f"SANDBOXD_ONLY={args.only}\n")
    vm.make_payload(
        run,
        {
            args.deb.name: args.deb,
            "checks.sh": args.checks,
            "checks.env": settings,
            "load.py": HERE / "load.py",
            "collusion.py": HERE / "collusion.py",
            "collusion_fs_cases.py": HERE.parent / "integration" / "collusion_fs_cases.py",
        },
    )
    timings.append(("payload disk", since(started)))

    started = time.monotonic()
    print("== boot and checks (guest output follows)", flush=True)
    report = Report()
    finished = vm.boot(built_image, run, args.timeout, report.line)
    timings.append(("boot + checks", since(started)))

    print("== timings")
    for name, seconds in timings:
        print(f"   {seconds:7.1f} s  {name}")
    ok = finished and report.verdict == "ok" and not report.failed
    if not finished:
        print(f"guest still running after {args.timeout:.0f} s: killed")
    elif report.verdict is None:
        print("guest powered off without a RESULT line")
    print(
        f"== {report.passed} passed, {len(report.failed)} failed, {report.skipped} skipped"
        f" (--only {args.only}): {'PASS' if ok else 'FAIL'}"
        if args.only
        else f"== {report.passed} passed, {len(report.failed)} failed: {'PASS' if ok else 'FAIL'}"
    )
    for name in report.failed:
        print(f"   failed: {name}")
    if not ok:
        print(f"   journal: {run.journal}\n   console: {run.console}")
    return 0 if ok else 1


class Report:
    """Follows the guest's lines: PASS/FAIL/SKIP name ..., INFO ..., RESULT ok|fail."""

    def __init__(self) -> None:
        self.passed = 0
        self.skipped = 0
        self.failed: list[str] = []
        self.verdict: str | None = None

    def line(self, text: str) -> None:
        print("   " + text, flush=True)
        word, _, rest = text.partition(" ")
        if word == "PASS":
            self.passed += 1
        elif word == "SKIP":
            self.skipped += 1
        elif word == "FAIL":
            self.failed.append(rest.split(" ", 1)[0])
        elif word == "RESULT":
            self.verdict = rest.strip()


def since(started: float) -> float:
    return time.monotonic() - started


def fail(message: str) -> int:
    print(f"systemtest: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
