"""Property-based fuzzing of the native protocol's sans-IO half: every byte sequence is
decoded into a request or a typed error, and LineBuffer splits any chunking of a
stream exactly as a reference model does."""

from __future__ import annotations

import json

import msgspec
from fuzzing import fuzz, json_values, request_objects
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.protocol import (
    LANGUAGES,
    ErrorReply,
    LineBuffer,
    LineTooLong,
    RunRequest,
    decode_request,
    encode,
)


def assert_typed(line: bytes) -> None:
    outcome = decode_request(line)
    if isinstance(outcome, RunRequest):
        assert outcome.language in LANGUAGES
        return
    assert isinstance(outcome, ErrorReply)
    assert outcome.error.code in ("bad_request", "unsupported_language")
    assert json.loads(encode(outcome))["error"]["code"] == outcome.error.code


@fuzz(1000)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_request_or_a_typed_error(line: bytes) -> None:
    assert_typed(line)


@fuzz(800)
@given(request_objects())
def test_near_valid_objects_decode_to_a_request_or_a_typed_error(obj: dict[str, object]) -> None:
    assert_typed(msgspec.json.encode(obj))


@fuzz(200)
@given(
    st.sampled_from(["id", "language", "code", "stdin", "timeout", "extra"]),
    st.integers(min_value=1, max_value=5000),
    st.booleans(),
)
def test_nesting_of_any_depth_in_any_field_is_typed(
    name: str, depth: int, as_objects: bool
) -> None:
    value = b'{"a":' * depth + b"1" + b"}" * depth if as_objects else b"[" * depth + b"]" * depth
    field = b'"' + name.encode() + b'": ' + value
    assert_typed(b'{"id": 1, "language": "python3", "code": "1", ' + field + b"}")
    assert_typed(b"{" + field + b', "id": 1}')


@fuzz(400)
@given(json_values)
def test_any_json_value_is_typed(value: object) -> None:
    assert_typed(msgspec.json.encode(value))


def reference_split(stream: bytes, max_line: int) -> tuple[list[bytes], int] | None:
    """What LineBuffer must give for `stream`: (lines, pending), None if it must refuse."""
    *complete, rest = stream.split(b"\n")
    if any(len(line) > max_line for line in complete) or len(rest) > max_line:
        return None
    return [line.strip() for line in complete if line.strip()], len(rest)


line_bytes = st.lists(
    st.sampled_from([b"a", b" ", b"\r", b"\n", b"{}", b"\t", b"xyz"]), max_size=60
).map(b"".join)


@fuzz(800)
@given(line_bytes, st.lists(st.integers(min_value=0, max_value=30), max_size=10),
       st.integers(min_value=1, max_value=12))  # fmt: skip
def test_line_buffer_matches_the_reference_under_any_chunking(
    stream: bytes, cuts: list[int], max_line: int
) -> None:
    chunks, position = [], 0
    for cut in sorted(cuts):
        chunks.append(stream[position:cut])
        position = max(position, cut)
    chunks.append(stream[position:])
    buffer = LineBuffer(max_line)
    lines: list[bytes] = []
    expected = reference_split(stream, max_line)
    try:
        for chunk in chunks:
            lines += buffer.feed(chunk)
    except LineTooLong:
        assert expected is None
        return
    assert expected == (lines, buffer.pending)
