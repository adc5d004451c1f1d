"""The soak's accounting: every request has exactly one outcome, and a short soak
with kill -9 of workers and of the zygote against a real daemon loses nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from bench.client import Answer, ErrorInfo
from bench.soak import SoakPlan, Tally, classify, error_kinds, soak


def test_outcomes_are_classified_by_what_came_back() -> None:
    assert classify(Answer(status="ok", stdout="5\n"), "5\n") == "ok"
    assert classify(Answer(status="ok", stdout="6\n"), "5\n") == "wrong"
    assert classify(Answer(status="killed"), "5\n") == "status:killed"
    assert classify(Answer(error=ErrorInfo("overloaded")), "5\n") == "error:overloaded"
    assert classify(None, "5\n") == "silent"
    assert classify(None, "5\n", "lost") == "lost"


def test_answered_is_sent_minus_silent_and_lost() -> None:
    tally = Tally()
    for outcome in ("ok", "ok", "error:overloaded", "status:killed", "silent", "lost"):
        tally.record(outcome)
    assert (tally.sent, tally.answered) == (6, 4)
    assert "sent 6, answered 4, ok 2, overloaded 1, wrong 0, silent 1, lost 1" in tally.summary()
    assert "status:killed 1" in tally.summary()


def test_error_lines_of_the_log_are_grouped_by_kind(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    log.write_text(
        "sandboxd: ERROR generation 1: the zygote (pid 10) died\n"
        "sandboxd: INFO healed: generation 2 serves\n"
        "sandboxd: ERROR generation 2: the zygote (pid 31) died\n"
    )
    assert error_kinds(log) == {"generation N: the zygote (pid N) died": 2}


def test_a_short_soak_with_kills_answers_every_request() -> None:
    if os.geteuid() != 0:
        pytest.fail("the soak starts a real daemon, which needs root")
    base = int(os.environ.get("SANDBOXD_TEST_UID_BASE", "200000")) + 1_000_000
    plan = SoakPlan(seconds=8, kill_every=0.3, zygote_every=3, sample_every=2, uid_min=base)
    run = trio.run(soak, plan)
    assert run.kills["worker"] > 0 and run.kills["zygote"] >= 1, run.kills
    assert run.good.outcomes["ok"] > 0, run.report(plan.seconds)
    assert run.good.answered == run.good.sent, run.report(plan.seconds)
    assert run.passed(), run.report(plan.seconds)
    assert sum(run.hostile["malformed line"].outcomes.values()) > 0
    assert len(run.rss) >= 2 and all(rss is not None for _, rss in run.rss)
