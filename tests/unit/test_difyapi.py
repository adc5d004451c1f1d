"""Every row of spec/dify-sandbox-api.md as a request in, response bytes out.

The Service is the shared fake (frontends.FakeService): the thing under test is the
API layer, never the sandbox.
"""

from __future__ import annotations

import json
from typing import Any, get_args

import msgspec
import pytest
from frontends import FakeService

from sandboxd import difyapi, jobs
from sandboxd.config import Config, HttpConfig, NetworkConfig, PythonConfig
from sandboxd.difyapi import Context, Request, Response
from sandboxd.jobs import Dependency
from sandboxd.metrics import Metrics
from sandboxd.protocol import ProtocolError, RequestId, RunResult, Status
from sandboxd.verdict import queued_too_long

KEY = "s3cret"
AUTH = [(b"x-api-key", KEY.encode())]


def result(
    status: Status = "ok",
    *,
    exit_code: int | None = 0,
    signal: int | None = None,
    stdout: str = "",
    stderr: str = "",
    request_id: RequestId = None,
) -> RunResult:
    return RunResult(
        id=request_id,
        status=status,
        exit_code=exit_code,
        signal=signal,
        stdout=stdout,
        stderr=stderr,
        truncated=False,
        wall_ms=1.0,
        cpu_ms=0.5,
        peak_memory_bytes=None,
    )


# What the fake answers a run with, unless a test gives another answer.
HELLO = result(stdout="hello\n")


def config(**sections: Any) -> Config:
    sections.setdefault("http", HttpConfig(api_key=KEY))
    return Config(**sections)


async def call(
    method: str,
    target: str,
    body: bytes | dict[str, Any] = b"",
    *,
    service: FakeService | None = None,
    cfg: Config | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    metrics: Metrics | None = None,
) -> Response:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    ctx = Context(
        service=service or FakeService(HELLO), config=cfg or config(), metrics=metrics or Metrics()
    )
    request = Request(method, target, AUTH if headers is None else headers, raw)
    return await difyapi.handle(request, ctx)


def envelope(response: Response) -> dict[str, Any]:
    assert response.content_type == b"application/json"
    decoded: dict[str, Any] = json.loads(response.body)
    assert set(decoded) == {"code", "message", "data"}
    return decoded


RUN = {"language": "python3", "code": "print('hello')", "preload": "", "enable_network": True}


# --- /health ---------------------------------------------------------------------------


async def test_health_is_the_json_string_ok_without_a_key() -> None:
    response = await call("GET", "/health", headers=[])
    assert (response.status, response.body) == (200, b'"ok"')


async def test_health_is_503_in_difys_envelope_with_retry_after_when_no_run_can_be_taken() -> None:
    service = FakeService(HELLO)
    service.down = "the daemon is stopping"
    response = await call("GET", "/health", headers=[], service=service)
    assert response.status == 503
    assert json.loads(response.body) == {
        "code": -503,
        "message": "unavailable: the daemon is stopping",
        "data": None,
    }
    assert (b"retry-after", b"1") in response.extra_headers


# --- auth ------------------------------------------------------------------------------

PROTECTED = [
    ("POST", "/v1/sandbox/run"),
    ("GET", "/v1/sandbox/dependencies?language=python3"),
    ("POST", "/v1/sandbox/dependencies/update"),
    ("GET", "/v1/sandbox/dependencies/refresh?language=python3"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(("method", "target"), PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [[], [(b"x-api-key", b"wrong")], [(b"x-api-key", b"")], [*AUTH, (b"x-api-key", b"wrong")]],
    ids=["missing", "wrong", "empty", "twice"],
)
async def test_bad_or_missing_key_is_401_with_an_empty_body(
    method: str, target: str, headers: list[tuple[bytes, bytes]]
) -> None:
    service = FakeService(HELLO)
    response = await call(method, target, RUN, headers=headers, service=service)
    assert (response.status, response.body) == (401, b"")
    assert service.jobs == [] and service.synced == []


async def test_native_run_without_key_is_401_with_an_error_reply() -> None:
    response = await call("POST", "/v1/run", RUN, headers=[])
    assert response.status == 401
    assert json.loads(response.body)["error"]["code"] == "unauthorized"


async def test_an_empty_configured_key_disables_auth() -> None:
    response = await call(
        "POST", "/v1/sandbox/run", RUN, headers=[], cfg=config(http=HttpConfig(api_key=""))
    )
    assert envelope(response)["code"] == 0


def test_key_comparison_is_constant_time_and_exact() -> None:
    assert difyapi.authorized([(b"x-api-key", b"abc")], "abc")
    assert not difyapi.authorized([(b"x-api-key", b"abcd")], "abc")
    assert not difyapi.authorized([(b"x-api-key", b"ab")], "abc")


# --- POST /v1/sandbox/run: success -----------------------------------------------------


async def test_a_run_answers_the_success_envelope() -> None:
    response = await call("POST", "/v1/sandbox/run", RUN)
    assert response.status == 200
    assert envelope(response) == {
        "code": 0,
        "message": "success",
        "data": {"stdout": "hello\n", "stderr": "", "error": "", "exit_code": 0},
    }


async def test_logging_to_stderr_with_exit_0_leaves_error_empty() -> None:
    service = FakeService(result(stdout="out", stderr="WARNING:root:careful\n"))
    data = envelope(await call("POST", "/v1/sandbox/run", RUN, service=service))["data"]
    assert data["error"] == ""
    assert data["stderr"] == "WARNING:root:careful\n"


async def test_unicode_goes_in_and_out_unchanged() -> None:
    service = FakeService(result(stdout="héllo 世界 🎉\n"))
    body = {**RUN, "code": "print('héllo 世界 🎉')"}
    response = await call("POST", "/v1/sandbox/run", body, service=service)
    assert envelope(response)["data"]["stdout"] == "héllo 世界 🎉\n"
    assert service.jobs[0][0].code == "print('héllo 世界 🎉')"


@pytest.mark.parametrize(
    ("run", "error", "exit_code"),
    [
        (result("ok", stderr="warn\n"), "", 0),
        (
            result("error", exit_code=1, stderr="Traceback...\nValueError: x\n"),
            "process exited with code 1\nTraceback...\nValueError: x\n",
            1,
        ),
        (
            result("timeout", exit_code=None, signal=9, stderr="partial"),
            "process exited with code -1\nerror: timeout\n",
            -1,
        ),
        (
            result("blocked_syscall", exit_code=None, signal=31, stderr="Bad system call\n"),
            "process exited with code -1\nerror: operation not permitted\nBad system call\n",
            -1,
        ),
        (
            result("memory", exit_code=None, signal=9, stderr="x"),
            "process exited with code -1\nerror: memory limit exceeded\nx",
            -1,
        ),
        (
            result("tasks", exit_code=1, stderr="fork failed\n"),
            "process exited with code -1\nerror: process or thread limit exceeded\nfork failed\n",
            -1,
        ),
        (
            result("output_limit", exit_code=None, signal=9),
            "process exited with code -1\nerror: output limit exceeded\n",
            -1,
        ),
        (
            result("killed", exit_code=None, signal=11, stderr=""),
            "process exited with code -1\nerror: killed by signal 11\n",
            -1,
        ),
    ],
    ids=lambda value: value.status if isinstance(value, RunResult) else None,
)
async def test_each_run_status_maps_to_dify_error_text_and_exit_code(
    run: RunResult, error: str, exit_code: int
) -> None:
    response = await call("POST", "/v1/sandbox/run", RUN, service=FakeService(run))
    body = envelope(response)
    assert (response.status, body["code"], body["message"]) == (200, 0, "success")
    assert body["data"]["error"] == error
    assert body["data"]["exit_code"] == exit_code
    assert body["data"]["stderr"] == run.stderr


def test_every_status_has_an_error_text() -> None:
    for status in get_args(Status):
        text = difyapi.error_text(result(status, exit_code=None))
        assert (text == "") == (status == "ok")


# --- POST /v1/sandbox/run: validation --------------------------------------------------


async def test_unknown_fields_are_ignored() -> None:
    body = {**RUN, "dependencies": [{"name": "numpy", "version": ""}], "x": 1}
    assert envelope(await call("POST", "/v1/sandbox/run", body))["code"] == 0


async def test_null_optional_fields_mean_absent() -> None:
    service = FakeService(HELLO)
    body = {**RUN, "preload": None, "enable_network": None}
    assert envelope(await call("POST", "/v1/sandbox/run", body, service=service))["code"] == 0
    assert service.jobs[0][0].preload == "" and not service.jobs[0][0].network


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"language": "python3"}, "code"),
        ({**RUN, "code": ""}, "code"),
        ({**RUN, "code": 42}, "code"),
        ({"code": "print(1)"}, "language"),
        ({**RUN, "language": 3}, "language"),
        ({**RUN, "enable_network": "false"}, "enable_network"),
        ({**RUN, "preload": ["import os"]}, "preload"),
    ],
)
async def test_validation_errors_are_400_naming_the_field(body: dict[str, Any], field: str) -> None:
    service = FakeService(HELLO)
    response = await call("POST", "/v1/sandbox/run", body, service=service)
    decoded = envelope(response)
    assert (response.status, decoded["code"], decoded["data"]) == (400, -400, None)
    assert f"`{field}`" in decoded["message"] or f"$.{field}" in decoded["message"]
    assert service.jobs == []


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b'{"language": "python3",}'])
async def test_a_body_that_is_not_json_is_400(raw: bytes) -> None:
    response = await call("POST", "/v1/sandbox/run", raw)
    decoded = envelope(response)
    assert (response.status, decoded["code"]) == (400, -400)
    assert decoded["message"].startswith("malformed JSON body")


async def test_a_json_array_is_400_saying_an_object_is_expected() -> None:
    response = await call("POST", "/v1/sandbox/run", b"[1, 2]")
    assert response.status == 400
    assert "object" in envelope(response)["message"]


@pytest.mark.parametrize("language", ["python2", "go", "Python3", ""])
async def test_an_unsupported_language_is_400(language: str) -> None:
    response = await call("POST", "/v1/sandbox/run", {**RUN, "language": language})
    assert response.status == 400
    assert envelope(response) == {"code": -400, "message": "unsupported language", "data": None}


async def test_nodejs_is_a_language() -> None:
    service = FakeService(HELLO)
    await call("POST", "/v1/sandbox/run", {**RUN, "language": "nodejs"}, service=service)
    assert service.jobs[0][0].language == "nodejs"


# --- network modes and preload ---------------------------------------------------------


async def test_deny_mode_runs_a_network_request_without_network() -> None:
    service = FakeService(HELLO)
    response = await call("POST", "/v1/sandbox/run", RUN, service=service)
    assert envelope(response)["code"] == 0
    assert service.jobs[0][0].network is False


async def test_reject_mode_answers_like_dify_sandbox() -> None:
    service = FakeService(HELLO)
    cfg = config(network=NetworkConfig(mode="reject"))
    response = await call("POST", "/v1/sandbox/run", RUN, service=service, cfg=cfg)
    assert response.status == 200
    assert envelope(response) == {
        "code": -400,
        "message": "network is disabled, please enable it in the configuration",
        "data": None,
    }
    assert service.jobs == []


async def test_reject_mode_still_runs_requests_without_network() -> None:
    service = FakeService(HELLO)
    cfg = config(network=NetworkConfig(mode="reject"))
    body = {**RUN, "enable_network": False}
    assert (
        envelope(await call("POST", "/v1/sandbox/run", body, service=service, cfg=cfg))["code"] == 0
    )


async def test_allow_mode_gives_the_job_network() -> None:
    service = FakeService(HELLO)
    cfg = config(network=NetworkConfig(mode="allow"))
    await call("POST", "/v1/sandbox/run", RUN, service=service, cfg=cfg)
    assert service.jobs[0][0].network is True


async def test_allow_mode_without_the_request_asking_gives_no_network() -> None:
    service = FakeService(HELLO)
    cfg = config(network=NetworkConfig(mode="allow"))
    await call(
        "POST", "/v1/sandbox/run", {**RUN, "enable_network": False}, service=service, cfg=cfg
    )
    assert service.jobs[0][0].network is False


async def test_preload_is_ignored_unless_enabled() -> None:
    service = FakeService(HELLO)
    await call("POST", "/v1/sandbox/run", {**RUN, "preload": "import os"}, service=service)
    assert service.jobs[0][0].preload == ""


async def test_preload_is_passed_to_the_job_when_enabled() -> None:
    service = FakeService(HELLO)
    cfg = config(python3=PythonConfig(enable_preload=True))
    await call("POST", "/v1/sandbox/run", {**RUN, "preload": "import os"}, service=service, cfg=cfg)
    assert service.jobs[0][0].preload == "import os"


async def test_the_job_takes_the_configured_limits() -> None:
    service = FakeService(HELLO)
    cfg = config()
    await call("POST", "/v1/sandbox/run", RUN, service=service, cfg=cfg)
    job = service.jobs[0][0]
    assert (job.timeout, job.memory_mb) == (cfg.limits.timeout, cfg.limits.memory_mb)


# --- service refusals ------------------------------------------------------------------


async def test_overloaded_is_503_too_many_requests() -> None:
    service = FakeService(ProtocolError("overloaded", "queue full"))
    response = await call("POST", "/v1/sandbox/run", RUN, service=service)
    assert response.status == 503
    assert envelope(response) == {"code": -503, "message": "Too many requests", "data": None}


async def test_a_sandbox_failure_is_http_200_code_minus_500() -> None:
    service = FakeService(ProtocolError("internal", "worker failed to start"))
    response = await call("POST", "/v1/sandbox/run", RUN, service=service)
    assert response.status == 200
    assert envelope(response) == {"code": -500, "message": "worker failed to start", "data": None}


async def test_a_language_the_service_refuses_is_400_unsupported_language() -> None:
    service = FakeService(ProtocolError("unsupported_language", "nodejs pool is off"))
    response = await call("POST", "/v1/sandbox/run", {**RUN, "language": "nodejs"}, service=service)
    assert response.status == 400
    assert envelope(response)["message"] == "unsupported language"


# --- dependencies ----------------------------------------------------------------------


async def test_dependencies_lists_what_the_service_reports() -> None:
    service = FakeService(
        HELLO, deps=[Dependency("jinja2", "3.1.2"), Dependency("httpx", "0.27.0")]
    )
    response = await call("GET", "/v1/sandbox/dependencies?language=python3", service=service)
    assert response.status == 200
    assert envelope(response) == {
        "code": 0,
        "message": "success",
        "data": {
            "dependencies": [
                {"name": "jinja2", "version": "3.1.2"},
                {"name": "httpx", "version": "0.27.0"},
            ]
        },
    }


async def test_dependencies_without_language_is_400_naming_it() -> None:
    response = await call("GET", "/v1/sandbox/dependencies")
    assert response.status == 400
    assert "`language`" in envelope(response)["message"]


async def test_dependencies_of_an_unknown_language_is_400() -> None:
    response = await call("GET", "/v1/sandbox/dependencies?language=go")
    assert (response.status, envelope(response)["message"]) == (400, "unsupported language")


async def test_dependencies_update_resyncs_and_answers_empty_data() -> None:
    service = FakeService(HELLO)
    response = await call(
        "POST", "/v1/sandbox/dependencies/update", {"language": "python3"}, service=service
    )
    assert (response.status, envelope(response)) == (
        200,
        {"code": 0, "message": "success", "data": {}},
    )
    assert service.synced == ["python3"]


async def test_dependencies_update_with_a_bad_body_is_400() -> None:
    response = await call("POST", "/v1/sandbox/dependencies/update", {"language": 1})
    assert response.status == 400
    assert "$.language" in envelope(response)["message"]


async def test_dependencies_refresh_resyncs_then_lists() -> None:
    service = FakeService(HELLO, deps=[Dependency("requests", "2.31.0")])
    response = await call(
        "GET", "/v1/sandbox/dependencies/refresh?language=python3", service=service
    )
    assert service.synced == ["python3"]
    assert envelope(response)["data"] == {
        "dependencies": [{"name": "requests", "version": "2.31.0"}]
    }


async def test_a_failed_refresh_when_offline_is_minus_500_not_a_crash() -> None:
    service = FakeService(HELLO, sync_error=ProtocolError("internal", "pip: no network"))
    response = await call(
        "GET", "/v1/sandbox/dependencies/refresh?language=python3", service=service
    )
    assert (response.status, envelope(response)["code"]) == (200, -500)
    assert "no network" in envelope(response)["message"]


# --- native POST /v1/run ---------------------------------------------------------------


async def test_native_run_answers_the_run_result() -> None:
    service = FakeService(result(stdout="4\n"))
    body = {"id": "r1", "language": "python3", "code": "print(2+2)", "timeout": 999}
    response = await call("POST", "/v1/run", body, service=service)
    assert response.status == 200
    decoded = json.loads(response.body)
    assert (decoded["id"], decoded["status"], decoded["stdout"]) == ("r1", "ok", "4\n")
    job, request_id = service.jobs[0]
    assert request_id == "r1"
    assert job.timeout == Config().limits.max_timeout  # capped


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{", 400, "bad_request"),
        (b'{"language": "python3", "code": "1", "extra": 1}', 400, "bad_request"),
        (b'{"language": "cobol", "code": "1"}', 400, "unsupported_language"),
        (b'{"language": "python3", "code": "1", "enable_network": "true"}', 400, "bad_request"),
    ],
)
async def test_native_run_refusals_are_error_replies(raw: bytes, status: int, code: str) -> None:
    response = await call("POST", "/v1/run", raw)
    assert response.status == status
    assert json.loads(response.body)["error"]["code"] == code


@pytest.mark.parametrize(
    ("error", "status"), [("overloaded", 503), ("internal", 500), ("unsupported_language", 400)]
)
async def test_native_run_service_errors_keep_their_code(error: Any, status: int) -> None:
    service = FakeService(ProtocolError(error, "no"))
    response = await call(
        "POST", "/v1/run", {"id": 7, "language": "python3", "code": "1"}, service=service
    )
    assert response.status == status
    detail = {"code": error, "message": "no"}
    if status == 503:
        detail["retry_after"] = 1
        assert (b"retry-after", b"1") in response.extra_headers
    assert json.loads(response.body) == {"id": 7, "error": detail}


async def test_native_run_with_network_in_reject_mode_is_400_in_the_native_envelope() -> None:
    service = FakeService(HELLO)
    cfg = config(network=NetworkConfig(mode="reject"))
    body = {"id": 3, "language": "python3", "code": "1", "enable_network": True}
    response = await call("POST", "/v1/run", body, service=service, cfg=cfg)
    assert response.status == 400
    assert json.loads(response.body) == {
        "id": 3, "error": {"code": "bad_request", "message": jobs.NETWORK_DISABLED}
    }  # fmt: skip
    assert service.jobs == []


async def test_dify_overloaded_is_503_with_retry_after() -> None:
    service = FakeService(ProtocolError("overloaded", "queue full"))
    response = await call("POST", "/v1/sandbox/run", RUN, service=service)
    assert response.status == 503
    assert (b"retry-after", b"1") in response.extra_headers


async def test_native_run_network_is_off_unless_allowed() -> None:
    service = FakeService(HELLO)
    body = {"language": "python3", "code": "1", "enable_network": True}
    await call("POST", "/v1/run", body, service=service)
    assert service.jobs[0][0].network is False


# --- metrics, routing, size ------------------------------------------------------------


async def test_metrics_renders_what_the_service_counted() -> None:
    metrics = Metrics()
    metrics.observe_run("python3", "ok", 0.002)
    response = await call("GET", "/metrics", metrics=metrics)
    assert response.status == 200
    assert response.content_type.startswith(b"text/plain; version=0.0.4")
    assert response.body == metrics.render()
    assert b'sandboxd_runs_total{language="python3",status="ok"} 1' in response.body


async def test_the_api_layer_leaves_run_counting_to_the_service() -> None:
    metrics = Metrics()
    await call("POST", "/v1/sandbox/run", RUN, metrics=metrics)
    assert b"sandboxd_runs_total{" not in metrics.render()


async def test_an_unknown_path_is_404() -> None:
    response = await call("GET", "/v2/nothing")
    assert (response.status, envelope(response)["code"]) == (404, -404)


async def test_a_wrong_method_is_405_with_allow() -> None:
    response = await call("GET", "/v1/sandbox/run")
    assert response.status == 405
    assert (b"allow", b"POST") in response.extra_headers


def test_too_large_uses_the_envelope_of_the_route() -> None:
    dify = difyapi.too_large("/v1/sandbox/run", 10)
    assert (dify.status, envelope(dify)["code"]) == (413, -413)
    assert "10 bytes" in envelope(dify)["message"]
    native = difyapi.too_large("/v1/run?x=1", 10)
    assert native.status == 413
    assert json.loads(native.body)["error"]["code"] == "too_large"


def test_a_request_that_never_got_a_worker_says_so_apart_from_a_run_timeout() -> None:
    queued = queued_too_long(4, 15_020.0, 15)
    assert (queued.id, queued.status, queued.exit_code) == (4, "timeout", None)
    assert queued.message == "no worker became free within 15 s"
    ran = msgspec.structs.replace(queued, message=None)
    assert difyapi.error_text(ran) == "process exited with code -1\nerror: timeout\n"
    assert difyapi.error_text(queued) == (
        "process exited with code -1\nerror: timeout (no worker became free within 15 s)\n"
    )
