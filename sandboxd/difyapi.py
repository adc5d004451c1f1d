"""The HTTP routes: dify-sandbox's API, the native POST /v1/run, /metrics and /health.

Sans-IO like h11: a route takes a parsed ``Request`` and gives a ``Response``;
the only awaits are on the Service (the daemon's core), so every row of
spec/dify-sandbox-api.md is a unit test with a fake Service and no socket.
http.py moves the bytes.

Decisions the spec leaves open (documented here, tested in test_difyapi.py):
- Routes are resolved before auth: an unknown path is 404 and a wrong method
  405 for anyone; every route but /health then requires X-Api-Key. 401 has an
  empty body except on /v1/run, which answers the native ErrorReply.
- An empty configured key turns auth off (dify-sandbox's behaviour);
  http.check_http_exposure refuses that anywhere but loopback.
- In the dify run body, ``null`` for an optional field means "absent" (Go's
  decoder does the same); any other wrong type is -400 naming the field.
- Validation order: body/types, then language, then the network mode.
- Limit verdicts report exit_code -1 (the process did not exit on its own), and
  the error text is ``process exited with code -1\\nerror: <reason>\\n`` + stderr;
  a timeout's text is exactly ``process exited with code -1\\nerror: timeout\\n``.
- A dify body over the cap is 413 with ``code: -413``; a sandbox failure
  (ProtocolError internal) is HTTP 200 ``code: -500`` as in dify-sandbox.
- Runs are counted in Metrics by the Service (the pool), not here, so the
  native socket and HTTP count alike; /metrics only renders them.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

import msgspec

from sandboxd import jobs, protocol
from sandboxd.artifacts import Artifact
from sandboxd.config import Config
from sandboxd.jobs import Dependency, Job, Service, job_from_request
from sandboxd.metrics import Metrics
from sandboxd.protocol import (
    ErrorCode,
    ErrorReply,
    Language,
    ProtocolError,
    RunResult,
    Status,
)

JSON = b"application/json"
PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"
# Seconds an unhealthy /health asks a client to wait (a pool restarts within seconds).
HEALTH_RETRY_AFTER = b"1"


@dataclass(frozen=True)
class Request:
    method: str
    # The request target as sent: path and query string.
    target: str
    # Header names lower-cased (h11 does that), values as bytes.
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: bytes = JSON
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True)
class Context:
    """What a route may use besides the request."""

    service: Service
    config: Config
    metrics: Metrics


# --- envelopes -------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


class Envelope(msgspec.Struct, frozen=True):
    code: int
    message: str
    data: object | None


class RunData(msgspec.Struct, frozen=True, omit_defaults=True):
    stdout: str
    stderr: str
    error: str
    exit_code: int
    # matplotlib figures the run left open, as PNG; left out when there are none, so the
    # answer is dify-sandbox's own (Dify ignores fields it does not know).
    images: list[Artifact] = []


class DependencyList(msgspec.Struct, frozen=True):
    dependencies: list[Dependency]


def envelope(status: int, code: int, message: str, data: object | None = None) -> Response:
    return Response(status, _encoder.encode(Envelope(code, message, data)))


def success(data: object) -> Response:
    return envelope(200, 0, "success", data)


UNAUTHORIZED = Response(401)

# How each ProtocolError the Service may raise looks to a Dify client:
# (HTTP status, envelope code, message; None keeps the error's own message).
_DIFY_ERRORS: dict[ErrorCode, tuple[int, int, str | None]] = {
    "bad_request": (400, -400, None),
    "unsupported_language": (400, -400, "unsupported language"),
    "too_large": (413, -413, None),
    "overloaded": (503, -503, "Too many requests"),
    "unauthorized": (401, -401, None),
    # The sandbox itself failed; dify-sandbox answers these with HTTP 200.
    "internal": (200, -500, None),
}


def retry_hint(seconds: int | None) -> tuple[tuple[bytes, bytes], ...]:
    """Retry-After for an error that says when to retry (every overloaded one: 503)."""
    return () if seconds is None else ((b"retry-after", str(seconds).encode()),)


def dify_error(error: ProtocolError) -> Response:
    if error.code == "unauthorized":
        return UNAUTHORIZED
    status, code, message = _DIFY_ERRORS[error.code]
    text = error.message if message is None else message
    body = _encoder.encode(Envelope(code, text, None))
    return Response(status, body, extra_headers=retry_hint(error.retry_after))


# HTTP status of each native ErrorReply code (DESIGN.md, "Native protocol").
_NATIVE_STATUS: dict[ErrorCode, int] = {
    "bad_request": 400,
    "unsupported_language": 400,
    "too_large": 413,
    "unauthorized": 401,
    "overloaded": 503,
    "internal": 500,
}


def native_error(reply: ErrorReply) -> Response:
    hint = retry_hint(reply.error.retry_after)
    return Response(_NATIVE_STATUS[reply.error.code], _encoder.encode(reply), extra_headers=hint)


# --- auth ------------------------------------------------------------------------------


def authorized(headers: list[tuple[bytes, bytes]], api_key: str) -> bool:
    """Exactly one X-Api-Key equal to the key, compared in constant time; "" disables auth."""
    if api_key == "":
        return True
    sent = [value for name, value in headers if name == b"x-api-key"]
    return len(sent) == 1 and hmac.compare_digest(sent[0], api_key.encode())


# --- dify run --------------------------------------------------------------------------

_LANGUAGES: dict[str, Language] = {name: name for name in protocol.LANGUAGES}


class DifyRunBody(msgspec.Struct, frozen=True):
    """Dify's run request; unknown fields (old Dify's ``dependencies``) are ignored."""

    language: str
    code: Annotated[str, msgspec.Meta(min_length=1)]
    preload: str | None = None
    enable_network: bool | None = None


_run_body = msgspec.json.Decoder(DifyRunBody)


class DifyLanguageBody(msgspec.Struct, frozen=True):
    language: str


_language_body = msgspec.json.Decoder(DifyLanguageBody)

T = TypeVar("T")


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T | Response:
    """Decoded body, or the -400 answer naming what is wrong."""
    decoded = protocol.decode_json(decoder, body)
    if not isinstance(decoded, protocol.Invalid):
        return decoded
    if decoded.kind == "invalid":
        return envelope(400, -400, f"invalid request: {decoded.message}")
    return envelope(400, -400, f"malformed JSON body: {decoded.message}")


def dify_job(body: bytes, config: Config) -> Job | Response:
    """The job a dify run body asks for, or the answer refusing it."""
    request = _decode(_run_body, body)
    if isinstance(request, Response):
        return request
    language = _LANGUAGES.get(request.language)
    if language is None:
        return envelope(400, -400, "unsupported language")
    try:
        network = jobs.network_of(bool(request.enable_network), config)
    except ProtocolError as refused:
        return envelope(200, -400, refused.message)
    preload = (request.preload or "") if config.python3.enable_preload else ""
    return Job(
        language=language,
        code=request.code,
        timeout=config.limits.timeout,
        memory_mb=config.limits.memory_mb,
        network=network,
        preload=preload,
    )


# Why a run that did not exit on its own ended, as the line after "process exited".
_VERDICT_REASONS: dict[Status, str] = {
    "timeout": "timeout",
    "memory": "memory limit exceeded",
    "tasks": "process or thread limit exceeded",
    "output_limit": "output limit exceeded",
    "blocked_syscall": "operation not permitted",
    "killed": "killed",
}


def _exit_code(result: RunResult) -> int:
    if result.status in ("ok", "error") and result.exit_code is not None:
        return result.exit_code
    return -1


def error_text(result: RunResult) -> str:
    """dify's ``data.error``: "" on exit 0, else what went wrong with stderr after it."""
    code = _exit_code(result)
    if result.status == "ok":
        return ""
    if result.status == "error":
        return f"process exited with code {code}\n{result.stderr}"
    reason = _VERDICT_REASONS[result.status]
    if result.status == "killed" and result.signal is not None:
        reason = f"killed by signal {result.signal}"
    if result.message:
        reason = f"{reason} ({result.message})"
    head = f"process exited with code {code}\nerror: {reason}\n"
    # The spec gives the timeout text exactly; the other verdicts keep stderr for the user.
    return head if result.status == "timeout" else head + result.stderr


def dify_result(result: RunResult) -> Response:
    return success(
        RunData(
            stdout=result.stdout,
            stderr=result.stderr,
            error=error_text(result),
            exit_code=_exit_code(result),
            images=result.images,
        )
    )


# --- routes ----------------------------------------------------------------------------


async def _health(request: Request, ctx: Context) -> Response:
    """200 "ok" while a run can be taken; else 503 in Dify's envelope, for a balancer."""
    reason = ctx.service.why_unavailable()
    if reason is None:
        return Response(200, b'"ok"')
    unhealthy = envelope(503, -503, f"unavailable: {reason}")
    return Response(503, unhealthy.body, extra_headers=((b"retry-after", HEALTH_RETRY_AFTER),))


async def _dify_run(request: Request, ctx: Context) -> Response:
    job = dify_job(request.body, ctx.config)
    if isinstance(job, Response):
        return job
    try:
        return dify_result(await ctx.service.run(job, None))
    except ProtocolError as exc:
        return dify_error(exc)


def _query_language(request: Request) -> Language | Response:
    values = parse_qs(urlsplit(request.target).query).get("language")
    if not values:
        return envelope(400, -400, "invalid request: missing query parameter `language`")
    return _LANGUAGES.get(values[0]) or envelope(400, -400, "unsupported language")


async def _dependencies(request: Request, ctx: Context) -> Response:
    language = _query_language(request)
    if isinstance(language, Response):
        return language
    try:
        deps = await ctx.service.dependencies(language)
    except ProtocolError as exc:
        return dify_error(exc)
    return success(DependencyList(deps))


async def _dependencies_update(request: Request, ctx: Context) -> Response:
    body = _decode(_language_body, request.body)
    if isinstance(body, Response):
        return body
    language = _LANGUAGES.get(body.language)
    if language is None:
        return envelope(400, -400, "unsupported language")
    try:
        await ctx.service.sync_dependencies(language)
    except ProtocolError as exc:
        return dify_error(exc)
    return success({})


async def _dependencies_refresh(request: Request, ctx: Context) -> Response:
    language = _query_language(request)
    if isinstance(language, Response):
        return language
    try:
        await ctx.service.sync_dependencies(language)
        deps = await ctx.service.dependencies(language)
    except ProtocolError as exc:
        return dify_error(exc)
    return success(DependencyList(deps))


async def _native_run(request: Request, ctx: Context) -> Response:
    decoded = protocol.decode_request(request.body)
    if isinstance(decoded, ErrorReply):
        return native_error(decoded)
    try:
        job = job_from_request(decoded, ctx.config)  # refuses enable_network in "reject" mode
        result = await ctx.service.run(job, decoded.id)
    except ProtocolError as exc:
        return native_error(exc.reply(decoded.id))
    return Response(200, _encoder.encode(result))


async def _metrics(request: Request, ctx: Context) -> Response:
    return Response(200, ctx.metrics.render(), PROMETHEUS_TEXT)


Handler = Callable[[Request, Context], Awaitable[Response]]
# none: open to all; dify: 401 with an empty body; native: 401 with an ErrorReply.
Auth = Literal["none", "dify", "native"]

ROUTES: dict[str, tuple[str, Handler, Auth]] = {
    "/health": ("GET", _health, "none"),
    "/v1/sandbox/run": ("POST", _dify_run, "dify"),
    "/v1/sandbox/dependencies": ("GET", _dependencies, "dify"),
    "/v1/sandbox/dependencies/update": ("POST", _dependencies_update, "dify"),
    "/v1/sandbox/dependencies/refresh": ("GET", _dependencies_refresh, "dify"),
    "/v1/run": ("POST", _native_run, "native"),
    "/metrics": ("GET", _metrics, "dify"),
}


def _path(target: str) -> str:
    return urlsplit(target).path


def _refused(path: str, code: ErrorCode, message: str) -> Response:
    """A refusal in the envelope of the route the client asked for."""
    if path in ROUTES and ROUTES[path][2] == "native":
        return native_error(ProtocolError(code, message).reply(None))
    return dify_error(ProtocolError(code, message))


def too_large(target: str, limit: int) -> Response:
    """413 for a body over the cap, in the envelope of the route asked for."""
    return _refused(_path(target), "too_large", f"request body is larger than {limit} bytes")


def refusal(request: Request, ctx: Context) -> Response | None:
    """The answer refusing a request on its head alone (404, 405, 401), None to go on.

    http.py asks this before it reads any body byte, so an unauthenticated client
    never makes the daemon buffer a body (invariant 17).
    """
    path = _path(request.target)
    route = ROUTES.get(path)
    if route is None:
        return envelope(404, -404, f"no route {path}")
    method, _handler, auth = route
    if request.method != method:
        return Response(
            405,
            _encoder.encode(Envelope(-405, f"{path} accepts {method} only", None)),
            extra_headers=((b"allow", method.encode()),),
        )
    if auth != "none" and not authorized(request.headers, ctx.config.http.api_key):
        if auth == "native":
            denied = ProtocolError("unauthorized", "bad or missing X-Api-Key")
            return native_error(denied.reply(None))
        return UNAUTHORIZED
    return None


def overloaded(target: str, message: str) -> Response:
    """503 with Retry-After, in the envelope of the route asked for."""
    return _refused(_path(target), "overloaded", message)


async def handle(request: Request, ctx: Context) -> Response:
    """Route, authorize and answer one complete request."""
    refused = refusal(request, ctx)
    if refused is not None:
        return refused
    return await ROUTES[_path(request.target)][1](request, ctx)
