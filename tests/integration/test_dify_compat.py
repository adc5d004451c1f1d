"""dify-sandbox behaviour Dify's deployments rely on, replayed against a real daemon."""

from __future__ import annotations

from tests.integration.conftest import Daemon
from tests.integration.test_http_daemon import (
    dify_outcome,
    dify_run,
    extract_json_result,
    python3_template,
)

# Four strings of 375,000 characters: within Dify's checks (400,000 each, 30 per array).
PARTS = 4
PART_CHARS = 375_000


def test_a_one_and_a_half_megabyte_node_output_comes_back_whole(daemon: Daemon) -> None:
    code = python3_template(
        f"def main() -> dict:\n    return {{'parts': ['z' * {PART_CHARS}] * {PARTS}}}\n", {}
    )
    stdout = dify_outcome(dify_run(daemon, code))
    assert len(stdout.encode()) > 1_500_000
    assert extract_json_result(stdout) == {"parts": ["z" * PART_CHARS] * PARTS}
    daemon.assert_healthy()
