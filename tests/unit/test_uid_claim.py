"""The host-wide uid range claim, in a private lock directory (no root needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sandboxd.jail.identity import UidRangeInUse, claim_uid_range


def test_overlapping_claim_is_refused_naming_the_held_range(tmp_path: Path) -> None:
    held = claim_uid_range(1000, 1999, str(tmp_path))
    try:
        with pytest.raises(UidRangeInUse, match=r"1500\.\.2500 overlaps uids 1000\.\.1999"):
            claim_uid_range(1500, 2500, str(tmp_path))
        claim_uid_range(2000, 2999, str(tmp_path)).close()  # disjoint: fine
    finally:
        held.close()
    claim_uid_range(1500, 2500, str(tmp_path)).close()  # given back: free again


def test_of_many_daemons_claiming_at_once_exactly_one_wins(tmp_path: Path) -> None:
    # Each child claims an overlapping range, reports, and holds it until stdin closes.
    child = (
        "import sys; from sandboxd.jail.identity import claim_uid_range, UidRangeInUse\n"
        "try:\n"
        f"    claim_uid_range(1000 + int(sys.argv[1]), 1100, {str(tmp_path)!r})\n"
        "    print('won', flush=True)\n"
        "except UidRangeInUse:\n"
        "    print('refused', flush=True)\n"
        "sys.stdin.read()\n"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", child, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(8)
    ]
    answers = []
    for process in children:
        assert process.stdout is not None
        answers.append(process.stdout.readline().strip())
    for process in children:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        process.wait()
        process.stdout.close()
    assert sorted(answers) == ["refused"] * 7 + ["won"]
