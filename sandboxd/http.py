"""HTTP/1.1 on trio streams; h11 parses and frames, difyapi answers.

One connection is served by one task (``serve_http``), one request at a time:
pipelined requests wait in h11's buffer and are answered in order.

Memory: a request's head is judged first (``difyapi.refusal``: route, method,
X-Api-Key), and a refused request gets its answer without one byte of its body
read; if a body was announced the connection then closes. Only a POST body is
kept, and only within the daemon-wide ByteBudget ([clients] max_buffered_bytes;
past it 503 with Retry-After and a close); any other body is read and dropped.
A body is read whole (Content-Length or chunked, up to ``max_body_bytes``; past
it 413 and a close) before difyapi sees it.

Timeouts, so a slow or silent client cannot hold a connection forever:
- ``header_timeout`` bounds a whole request from its first byte to the end of
  its body, and a fresh connection's wait for that first byte; a partial
  request that runs out of time gets 408 and a close.
- ``idle_timeout`` bounds the wait for the next request on a kept-alive
  connection, and each write of an answer (a client that does not read).

Closing: after our last answer we shut our side down and read (and drop)
what the client still sends, for at most ``header_timeout``, so a client that
is still uploading a refused body reads our 413 instead of a connection reset.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from http import HTTPStatus

import h11
import trio

from sandboxd import difyapi
from sandboxd.budget import ByteBudget, Holding, request_cost
from sandboxd.config import Config, parse_listen
from sandboxd.difyapi import Context, Response
from sandboxd.jobs import Service
from sandboxd.metrics import Metrics
from sandboxd.server import describe_peer

# parse_listen lives with the config loader, which validates [http] listen; it is
# re-exported here so the HTTP front end's names are found in one place.
__all__ = [
    "ExposureError",
    "check_http_exposure",
    "overloaded_refusal",
    "parse_listen",
    "serve_http",
]

log = logging.getLogger(__name__)

RECEIVE_SIZE = 64 * 1024
# Longest request head (request line and headers) h11 buffers.
MAX_HEAD_BYTES = 64 * 1024
SERVER_HEADER = b"sandboxd"
# The key dify-sandbox ships with: public knowledge, so no protection at all.
DEFAULT_API_KEY = "dify-sandbox"


# --- configuration helpers -------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


class ExposureError(Exception):
    """The HTTP API would be reachable from other hosts without a real key."""


def check_http_exposure(config: Config) -> None:
    """Refuse a non-loopback listen address with the default or an empty API key."""
    try:
        address = parse_listen(config.http.listen)
    except ValueError as exc:
        raise ExposureError(f"[http] listen: {exc}") from exc
    if address is None or is_loopback(address[0]):
        return
    if config.http.api_key in ("", DEFAULT_API_KEY):
        which = "an empty" if config.http.api_key == "" else f"the default ({DEFAULT_API_KEY!r})"
        raise ExposureError(
            f"refusing to serve HTTP on {config.http.listen} with {which} API key: anyone "
            "who can reach it could run code; set [http] api_key (or API_KEY) to a secret, "
            'or listen on 127.0.0.1 (or "none")'
        )


# --- one connection --------------------------------------------------------------------


class _Closed(Exception):
    """The connection is over: the client left, timed out or broke the protocol."""


BUFFERS_FULL = "the daemon holds too many request bytes; retry later"


def frame(
    conn: h11.Connection, response: Response, *, close: bool, head_only: bool = False
) -> bytes:
    """`response` as bytes on `conn`; a HEAD answer (`head_only`) has no body."""
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", str(len(response.body)).encode()),
        (b"server", SERVER_HEADER),
        *response.extra_headers,
    ]
    if close:
        headers.append((b"connection", b"close"))
    reason = HTTPStatus(response.status).phrase.encode()
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    if not head_only:  # h11 frames a HEAD answer without a body
        data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    return data or b""


def overloaded_refusal(max_connections: int) -> bytes:
    """What an HTTP client over the connection cap reads before the close: 503."""
    message = f"more than {max_connections} connections on this socket; retry later"
    return frame(h11.Connection(h11.SERVER), difyapi.overloaded("/", message), close=True)


def _has_body(request: h11.Request) -> bool:
    length = _content_length(request)
    chunked = any(name == b"transfer-encoding" for name, _ in request.headers)
    return chunked or bool(length)


class _Connection:
    def __init__(self, stream: trio.abc.Stream, ctx: Context, budget: ByteBudget) -> None:
        self.stream = stream
        self.ctx = ctx
        self.budget = budget
        self.http = ctx.config.http
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.first_request = True
        # Method of the request being answered (a HEAD answer has no body).
        self.method = b""
        # trio time by which the current wait must end.
        self.deadline = trio.current_time() + self.http.header_timeout

    async def serve(self) -> None:
        while True:
            request = await self._read_head()
            self.method = request.method
            refused = difyapi.refusal(_parsed(request, b""), self.ctx)
            if refused is not None and _has_body(request):
                await self._send(refused, close=True)  # not one byte of the body is read
                return
            declared = _content_length(request)
            if declared is not None and declared > self.http.max_body_bytes:
                await self._too_large(request)
                return
            with Holding(self.budget) as held:
                body = await self._read_body(request, held)
                response = refused or await self._answer(request, body)
                await self._send(response)
            if self.conn.our_state is h11.MUST_CLOSE:
                return
            self.conn.start_next_cycle()
            self.first_request = False

    async def _read_head(self) -> h11.Request:
        """The next request's head; the request deadline starts with its first byte."""
        buffered = bool(self.conn.trailing_data[0])
        waiting = self.http.header_timeout if self.first_request else self.http.idle_timeout
        self.deadline = trio.current_time() + (self.http.header_timeout if buffered else waiting)
        event = await self._next_event(started=buffered)
        if isinstance(event, h11.Request):
            return event
        # ConnectionClosed: the client hung up between requests.
        raise _Closed

    async def _read_body(self, request: h11.Request, held: Holding) -> bytes:
        """A POST body, held in the budget; any other body is read and dropped."""
        keep = request.method == b"POST"
        if keep and not held.resize(request_cost(_content_length(request) or 0)):
            await self._overloaded(request)
        body = bytearray()
        size = 0
        while True:
            event = await self._next_event(started=True)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.http.max_body_bytes:
                    await self._too_large(request)
                    raise _Closed
                if keep:
                    body += event.data
                    cost = request_cost(len(body))
                    if cost > held.held and not held.resize(cost):
                        await self._overloaded(request)
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:  # ConnectionClosed mid-body
                raise _Closed

    async def _next_event(self, *, started: bool) -> h11.Event:
        """Next h11 event within the current deadline; 408/400 and _Closed on failure."""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint, f"bad HTTP request: {exc}")
                raise _Closed from exc
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:  # cannot happen: we read only while a request is open
                raise _Closed
            if self.conn.they_are_waiting_for_100_continue:
                await self._send_bytes(
                    self.conn.send(
                        h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                    )
                )
            with trio.CancelScope(deadline=self.deadline):
                data = await self.stream.receive_some(RECEIVE_SIZE)
                self.conn.receive_data(bytes(data))
                if data and not started:
                    # First byte of a request: from now on the request deadline applies.
                    started = True
                    self.deadline = trio.current_time() + self.http.header_timeout
                continue
            if started:
                await self._refuse(408, "request not received in time")
            raise _Closed

    async def _answer(self, request: h11.Request, body: bytes) -> Response:
        parsed = _parsed(request, body)
        try:
            return await difyapi.handle(parsed, self.ctx)
        except Exception:  # a bug in a route: answer 500 and keep the daemon serving
            log.exception("unhandled error answering %s %s", parsed.method, parsed.target)
            return difyapi.envelope(500, -500, "internal error")

    async def _overloaded(self, request: h11.Request) -> None:
        """503 for a body the daemon has no room to hold; the connection closes."""
        target = request.target.decode("ascii", "replace")
        await self._send(difyapi.overloaded(target, BUFFERS_FULL), close=True)
        raise _Closed

    async def _too_large(self, request: h11.Request) -> None:
        target = request.target.decode("ascii", "replace")
        await self._send(difyapi.too_large(target, self.http.max_body_bytes), close=True)

    async def _refuse(self, status: int, message: str) -> None:
        """An error answer when the protocol state still allows one."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send(difyapi.envelope(status, -status, message), close=True)

    async def _send(self, response: Response, *, close: bool = False) -> None:
        head_only = self.method == b"HEAD"
        await self._send_bytes(frame(self.conn, response, close=close, head_only=head_only))

    async def _send_bytes(self, data: bytes | None) -> None:
        if not data:
            return
        with trio.move_on_after(self.http.idle_timeout):
            await self.stream.send_all(data)
            return
        raise _Closed  # the client stopped reading

    async def linger(self) -> None:
        """Half-close and drop what the client still sends, for a bounded time."""
        if not isinstance(self.stream, trio.abc.HalfCloseableStream):
            return
        with trio.move_on_after(self.http.header_timeout):
            await self.stream.send_eof()
            while await self.stream.receive_some(RECEIVE_SIZE):
                pass


def _parsed(request: h11.Request, body: bytes) -> difyapi.Request:
    return difyapi.Request(
        method=request.method.decode("ascii", "replace"),
        target=request.target.decode("ascii", "replace"),
        headers=[(name, value) for name, value in request.headers],
        body=body,
    )


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is a number
    return None


async def serve_http(
    stream: trio.abc.Stream,
    service: Service,
    config: Config,
    metrics: Metrics,
    budget: ByteBudget | None = None,
) -> None:
    """Serve one HTTP connection until it closes; never raises for a client's doing.

    `budget` is shared by all connections of a daemon; None gives this one its own.
    """
    budget = budget if budget is not None else ByteBudget(config.clients.max_buffered_bytes)
    ctx = Context(service=service, config=config, metrics=metrics)
    connection = _Connection(stream, ctx, budget)
    try:
        # _Closed: the reason was answered (408/413/400) or the client left.
        with contextlib.suppress(_Closed):
            await connection.serve()
        await connection.linger()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("HTTP client reset the connection")
    except Exception:  # a bug here must cost one connection, not the daemon's listener
        log.exception("HTTP connection failed (%s)", describe_peer(stream))
    finally:
        await stream.aclose()
