"""Property-based fuzzing of the Dify envelope mapping (sans-IO): any body becomes a
Job or a typed refusal, any result a well-formed success envelope, and any
ProtocolError the envelope and status its table names (503 with Retry-After)."""

from __future__ import annotations

from typing import Any, get_args

import msgspec
from fuzzing import fuzz, json_values, request_objects
from hypothesis import given
from hypothesis import strategies as st

from sandboxd import difyapi
from sandboxd.config import Config, NetworkConfig
from sandboxd.jobs import Job
from sandboxd.protocol import LANGUAGES, ErrorCode, ProtocolError, RunResult, Status

bodies = st.one_of(
    request_objects().map(msgspec.json.encode),
    json_values.map(msgspec.json.encode),
    st.binary(max_size=60),
    st.integers(1, 3000).map(lambda depth: b'{"language": "python3", "x": ' + b"[" * depth),
)


@fuzz(800)
@given(bodies, st.sampled_from(["deny", "reject", "allow"]))
def test_any_dify_body_is_a_job_or_a_typed_refusal(body: bytes, mode: Any) -> None:
    config = Config(network=NetworkConfig(mode=mode))
    outcome = difyapi.dify_job(body, config)
    if isinstance(outcome, Job):
        assert outcome.language in LANGUAGES and outcome.code
        assert not outcome.network or mode == "allow"
        return
    assert outcome.status in (200, 400)
    envelope = msgspec.json.decode(outcome.body)
    assert envelope["code"] == -400 and envelope["data"] is None


results = st.builds(
    RunResult,
    id=st.none() | st.integers() | st.text(max_size=4),
    status=st.sampled_from(get_args(Status)),
    exit_code=st.none() | st.integers(-300, 300),
    signal=st.none() | st.integers(1, 64),
    stdout=st.text(max_size=20),
    stderr=st.text(max_size=20),
    truncated=st.booleans(),
    wall_ms=st.floats(0, 1e6),
    cpu_ms=st.floats(0, 1e6),
    peak_memory_bytes=st.none() | st.integers(0, 2**40),
    message=st.none() | st.text(max_size=20),
)


@fuzz(800)
@given(results)
def test_any_result_is_a_success_envelope_dify_reads(result: RunResult) -> None:
    response = difyapi.dify_result(result)
    assert response.status == 200
    envelope = msgspec.json.decode(response.body)
    assert (envelope["code"], envelope["message"]) == (0, "success")
    data = envelope["data"]
    assert (data["stdout"], data["stderr"]) == (result.stdout, result.stderr)
    assert (data["error"] == "") == (result.status == "ok")
    if result.status not in ("ok", "error"):
        assert data["exit_code"] == -1
        assert data["error"].startswith("process exited with code -1\nerror: ")


@fuzz(200)
@given(st.sampled_from(get_args(ErrorCode)), st.text(max_size=20))
def test_any_service_error_has_its_tabled_status(code: ErrorCode, message: str) -> None:
    response = difyapi.dify_error(ProtocolError(code, message))
    native = difyapi.native_error(ProtocolError(code, message).reply(None))
    for answer in (response, native):
        hint = dict(answer.extra_headers).get(b"retry-after")
        assert (hint == b"1") == (answer.status == 503)
    assert response.status == {"unauthorized": 401}.get(code, difyapi._DIFY_ERRORS[code][0])
