"""Property-based fuzzing of the front ends through their real connection handlers:
random NDJSON lines and random HTTP requests (heads, bodies, framing, chunking) go
into serve_ndjson and serve_http over an in-memory stream pair with a fake Service.
Each case ends in typed answers and a close: nothing escapes the handler, nothing is
logged as an error, every answer parses, and every 503 carries Retry-After."""

from __future__ import annotations

import itertools
import json
from functools import partial
from typing import Any

import msgspec
from frontends import FakeService, exchange, http_responses
from fuzzing import fuzz, no_errors_logged, request_objects
from hypothesis import event, given
from hypothesis import strategies as st

from sandboxd.config import ClientsConfig, Config, HttpConfig, ServerConfig
from sandboxd.http import serve_http
from sandboxd.metrics import Metrics
from sandboxd.server import serve_ndjson

KEY = "fuzz-key"
CONFIG = Config(
    server=ServerConfig(max_line_bytes=2000),
    http=HttpConfig(api_key=KEY, max_body_bytes=2000),
    clients=ClientsConfig(max_buffered_bytes=4000, max_unsent_bytes=4000),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` split at the positions `cuts` (taken modulo its length)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# --- NDJSON -----------------------------------------------------------------------------

ndjson_lines = st.one_of(
    request_objects().map(msgspec.json.encode),
    st.fixed_dictionaries(
        {"language": st.sampled_from(["python3", "nodejs"]),
         "code": st.sampled_from(["print(1)", "overloaded", "internal", "x" * 2500])},
        optional={"id": st.integers() | st.text(max_size=5)},
    ).map(msgspec.json.encode),
    st.binary(max_size=60).filter(lambda line: b"\n" not in line),
    st.integers(min_value=1, max_value=3000).map(lambda depth: b"[" * depth + b"]" * depth),
)  # fmt: skip


@fuzz(300)
@given(st.lists(ndjson_lines, max_size=6), st.lists(st.integers(min_value=0), max_size=6))
def test_ndjson_connection_answers_every_line_with_a_typed_line(
    lines: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    with no_errors_logged():
        out = exchange(
            partial(serve_ndjson, service=FakeService(), config=CONFIG), chunked(stream, cuts)
        )
    answers = [json.loads(line) for line in out.splitlines()]
    for answer in answers:
        assert set(answer) in ({"id", "error"}, set(answer) | {"id", "status"})
        if "error" in answer and answer["error"]["code"] == "overloaded":
            assert answer["error"]["retry_after"] >= 1
    refused = [a for a in answers if a.get("error", {}).get("code") in ("too_large",)]
    if not refused:  # a too-long line closes the connection: later lines are not answered
        assert len(answers) == sum(1 for line in lines if line.strip())


# --- HTTP -------------------------------------------------------------------------------

TARGETS = ["/v1/sandbox/run", "/v1/run", "/v1/sandbox/run", "/v1/run",
           "/v1/sandbox/dependencies?language=python3", "/v1/sandbox/dependencies/update",
           "/v1/sandbox/dependencies/refresh?language=x", "/health", "/metrics", "/nope", "*",
           "/v1/run?x=%zz"]  # fmt: skip
METHODS = [b"POST", b"GET", b"PUT", b"OPTIONS", b"G\x00T", b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"XYZ"]
VALID_BODIES = [
    b'{"language": "python3", "code": "print(1)"}',
    b'{"language": "nodejs", "code": "1", "enable_network": true, "x": [[[1]]]}',
    b'{"language": "python3", "code": "overloaded"}',
]
BODIES = st.one_of(
    st.sampled_from(VALID_BODIES),
    st.sampled_from(VALID_BODIES),
    request_objects().map(msgspec.json.encode),
    st.binary(max_size=80),
    st.integers(min_value=1, max_value=3000).map(lambda depth: b'{"a":' + b"[" * depth),
)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """Half well-formed requests to the routes with the key; half anything goes."""
    wild = draw(st.booleans())
    method = draw(st.sampled_from(METHODS if wild else [b"POST", b"GET"]))
    rare = wild and draw(st.integers(0, 3)) == 0
    target = draw(st.text(max_size=10) if rare else st.sampled_from(TARGETS)).encode()
    body = draw(BODIES)
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"t")]
    key = draw(st.sampled_from([KEY, "wrong", "", None, "dup"])) if wild else KEY
    if key == "dup":
        headers += [(b"X-Api-Key", KEY.encode())] * 2
    elif key is not None:
        headers.append((b"X-Api-Key", key.encode()))
    framings = ["length", "chunked"] + (["none", "wrong-length", "bad-length"] if wild else [])
    framing = draw(st.sampled_from(framings))
    if framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        size = draw(st.integers(min_value=1, max_value=max(1, len(body))))
        parts = [body[i : i + size] for i in range(0, len(body), size)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    elif framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "wrong-length":
        headers.append((b"Content-Length", str(draw(st.integers(0, 5000))).encode()))
    elif framing == "bad-length":
        bad = draw(st.sampled_from([b"-1", b"x", b"1, 2", b"9" * 30]))
        headers.append((b"Content-Length", bad))
    else:
        body = b""
    if draw(st.booleans()):
        headers.append((b"Expect", b"100-continue"))
    if wild:
        junk = st.tuples(st.binary(max_size=8), st.binary(max_size=8))
        headers += draw(st.lists(junk, max_size=2))
    version = draw(st.sampled_from(VERSIONS)) if wild else b"HTTP/1.1"
    head = method + b" " + target + b" " + version + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


ALLOWED_STATUS = {200, 400, 401, 404, 405, 408, 413, 431, 501, 503, 505}


@fuzz(600)
@given(
    st.lists(http_requests(), min_size=1, max_size=3),
    st.lists(st.integers(min_value=0), max_size=6),
    st.just(b"") | st.binary(max_size=20),
    st.booleans(),
)
def test_http_connection_gives_typed_answers_then_closes(
    requests: list[bytes], cuts: list[int], junk: bytes, half_close: bool
) -> None:
    stream = b"".join(requests) + junk
    service = FakeService()
    serve = partial(serve_http, service=service, config=CONFIG, metrics=Metrics())
    with no_errors_logged():
        out = exchange(serve, chunked(stream, cuts), half_close=half_close)
    for head, body in http_responses(out):
        event(f"HTTP {head.status_code}")
        assert head.status_code in ALLOWED_STATUS, (head, body)
        headers: dict[bytes, Any] = dict(head.headers)
        if head.status_code == 503:
            assert headers[b"retry-after"] == b"1"
        if body and headers.get(b"content-type") == b"application/json":
            json.loads(body)
    # Only a request with the key, sent once, can reach the service.
    with_key = sum(
        request.count(b"X-Api-Key: " + KEY.encode() + b"\r\n") == 1 for request in requests
    )
    assert len(service.jobs) <= with_key
