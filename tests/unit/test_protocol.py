"""The native protocol on bytes: framing, validation, encoding."""

from __future__ import annotations

import json

import pytest

from sandboxd.protocol import (
    RETRY_AFTER_SECONDS,
    ErrorReply,
    LineBuffer,
    LineTooLong,
    ProtocolError,
    RunRequest,
    RunResult,
    decode_request,
    encode,
)


def _error(line: bytes) -> ErrorReply:
    reply = decode_request(line)
    assert isinstance(reply, ErrorReply)
    return reply


def test_minimal_request_decodes_with_defaults() -> None:
    request = decode_request(b'{"language": "python3", "code": "print(1)"}')
    assert request == RunRequest(language="python3", code="print(1)")
    assert isinstance(request, RunRequest)
    assert request.enable_network is False
    assert request.id is None


def test_full_request_decodes() -> None:
    request = decode_request(
        b'{"id": "a", "language": "nodejs", "code": "1", "stdin": "x", "timeout": 2.5,'
        b' "memory_mb": 64, "enable_network": true}'
    )
    assert request == RunRequest(
        language="nodejs",
        code="1",
        id="a",
        stdin="x",
        timeout=2.5,
        memory_mb=64,
        enable_network=True,
    )


def test_malformed_json_is_bad_request_without_id() -> None:
    reply = _error(b'{"language": "python3",')
    assert reply.id is None
    assert reply.error.code == "bad_request"
    assert "malformed JSON" in reply.error.message


def test_missing_field_is_named() -> None:
    reply = _error(b'{"id": 3, "language": "python3"}')
    assert reply.id == 3
    assert "code" in reply.error.message


def test_wrong_type_names_the_field_path() -> None:
    assert (
        "$.timeout" in _error(b'{"language": "python3", "code": "", "timeout": "5"}').error.message
    )


def test_string_false_is_not_a_bool() -> None:
    message = _error(
        b'{"language": "python3", "code": "", "enable_network": "false"}'
    ).error.message
    assert "$.enable_network" in message


def test_unknown_field_is_an_error() -> None:
    assert "preload" in _error(b'{"language": "python3", "code": "", "preload": "x"}').error.message


@pytest.mark.parametrize("field", ['"timeout": 0', '"timeout": -1', '"memory_mb": 0'])
def test_limits_must_be_positive(field: str) -> None:
    line = b'{"language": "python3", "code": "", ' + field.encode() + b"}"
    assert _error(line).error.code == "bad_request"


def test_unknown_language_is_unsupported_language() -> None:
    reply = _error(b'{"id": 1, "language": "cobol", "code": ""}')
    assert reply.id == 1
    assert reply.error.code == "unsupported_language"


def test_not_an_object_is_bad_request() -> None:
    assert _error(b"[1, 2]").error.code == "bad_request"


def test_result_encodes_as_one_line() -> None:
    result = RunResult(
        id=7,
        status="ok",
        exit_code=0,
        signal=None,
        stdout="a\nb",
        stderr="",
        truncated=False,
        wall_ms=1.5,
        cpu_ms=1.0,
        peak_memory_bytes=None,
    )
    line = encode(result)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["stdout"] == "a\nb"


def test_error_reply_encodes() -> None:
    line = encode(ProtocolError("bad_request", "no").reply("x"))
    assert json.loads(line) == {"id": "x", "error": {"code": "bad_request", "message": "no"}}


def test_overloaded_reply_says_when_to_retry() -> None:
    line = encode(ProtocolError("overloaded", "busy").reply("x"))
    error = {"code": "overloaded", "message": "busy", "retry_after": RETRY_AFTER_SECONDS}
    assert json.loads(line) == {"id": "x", "error": error}


def test_deep_nesting_is_a_typed_error_on_every_field() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for line in (
        b'{"language":"python3","code":' + b"[" * 1100 + b"]" * 1100 + b"}",
        b'{"id": 5, "language":"python3","code":' + deep + b"}",
        b'{"id": 5, "language":"python3","code":"1","extra":' + deep + b"}",
        b'{"extra":' + deep + b', "id": 5}',
        deep,
        b"{" * 100_000,
    ):
        reply = _error(line)
        assert reply.error.code == "bad_request"


def test_line_buffer_splits_and_keeps_partial_lines() -> None:
    lines = LineBuffer(100)
    assert lines.feed(b'{"a": 1}\n{"b"') == [b'{"a": 1}']
    assert lines.pending == 4
    assert lines.feed(b": 2}\r\n\n  \n") == [b'{"b": 2}']
    assert lines.pending == 0


def test_line_buffer_refuses_a_long_line_without_newline() -> None:
    lines = LineBuffer(10)
    with pytest.raises(LineTooLong):
        lines.feed(b"x" * 11)


def test_line_buffer_refuses_a_long_complete_line() -> None:
    with pytest.raises(LineTooLong):
        LineBuffer(10).feed(b"x" * 20 + b"\n")


def test_line_buffer_accepts_a_line_exactly_at_the_cap() -> None:
    assert LineBuffer(10).feed(b"x" * 10 + b"\n") == [b"x" * 10]
