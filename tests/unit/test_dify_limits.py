"""The default caps fit Dify: output several MB, and a body that can carry it on."""

from __future__ import annotations

from sandboxd.config import Config

# Dify's code-node checks: strings up to 400,000 characters.
DIFY_MAX_STRING = 400_000


def test_output_cap_holds_twenty_of_difys_longest_strings() -> None:
    assert Config().limits.output_bytes >= 20 * DIFY_MAX_STRING


def test_body_cap_carries_a_full_output_base64_encoded_with_code() -> None:
    config = Config()
    assert config.http.max_body_bytes >= config.limits.output_bytes * 4 // 3 + 1024 * 1024
