"""The native protocol: NDJSON framing, request validation and result encoding.

Sans-IO (h11's habit): everything here takes bytes or structs and returns bytes
or structs, so every edge case is a unit test without a socket.

One JSON object per line. A request that fails to parse or validate gets an
ErrorReply naming the field and the connection stays usable; a line longer than
the cap gets ``too_large`` and the connection is closed by the caller.

Decoding is total: every byte sequence becomes a RunRequest or an ErrorReply.
msgspec checks its own recursion depth and raises RecursionError (a clean
exception, never a stack overflow) past the interpreter's limit; ``decode_json``
turns that into a typed error, so a deeply nested value costs one answer.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgspec

from sandboxd.artifacts import Artifact

Language = Literal["python3", "nodejs"]
LANGUAGES: tuple[Language, ...] = ("python3", "nodejs")

Status = Literal[
    "ok", "error", "timeout", "memory", "tasks", "output_limit", "blocked_syscall", "killed"
]
ErrorCode = Literal[
    "bad_request", "unsupported_language", "too_large", "overloaded", "unauthorized", "internal"
]
RequestId = str | int | None

PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
PositiveMiB = Annotated[int, msgspec.Meta(gt=0)]


class RunRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A request as a client sends it; strict types, unknown fields refused."""

    language: str
    code: str
    id: RequestId = None
    stdin: str = ""
    timeout: PositiveSeconds | None = None
    memory_mb: PositiveMiB | None = None
    enable_network: bool = False
    # name -> base64 contents, written into the run's working directory (python3 only).
    files: dict[str, str] = {}


class RunResult(msgspec.Struct, frozen=True):
    """What a run came to; every field but stdout/stderr comes from the kernel."""

    id: RequestId
    status: Status
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    truncated: bool
    wall_ms: float
    cpu_ms: float
    peak_memory_bytes: int | None
    # What the daemon knows beyond the status, e.g. the name of a blocked system call.
    message: str | None = None
    # matplotlib figures left open, as PNG; files the run wrote under /tmp/out.
    images: list[Artifact] = []
    files: list[Artifact] = []


# Seconds an overloaded client is told to wait before it retries (HTTP Retry-After too).
RETRY_AFTER_SECONDS = 1


class ErrorDetail(msgspec.Struct, frozen=True, omit_defaults=True):
    code: ErrorCode
    message: str
    # Seconds after which a retry may succeed; set on every overloaded error.
    retry_after: int | None = None


class ErrorReply(msgspec.Struct, frozen=True):
    id: RequestId
    error: ErrorDetail


class ProtocolError(Exception):
    """An error that becomes an ErrorReply; raised where a request cannot proceed."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message

    @property
    def retry_after(self) -> int | None:
        return RETRY_AFTER_SECONDS if self.code == "overloaded" else None

    def reply(self, request_id: RequestId) -> ErrorReply:
        detail = ErrorDetail(code=self.code, message=self.message, retry_after=self.retry_after)
        return ErrorReply(id=request_id, error=detail)


_request_decoder = msgspec.json.Decoder(RunRequest)
_encoder = msgspec.json.Encoder()


class _IdOnly(msgspec.Struct):
    id: RequestId = None


_id_decoder = msgspec.json.Decoder(_IdOnly)

T = TypeVar("T")


class Invalid(msgspec.Struct, frozen=True):
    """Why a JSON document was refused: ``malformed`` JSON or an ``invalid`` value."""

    kind: Literal["malformed", "invalid"]
    message: str


def decode_json(decoder: msgspec.json.Decoder[T], data: bytes) -> T | Invalid:
    """Decode with `decoder`, every failure (nesting too deep included) an Invalid."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        return Invalid("invalid", str(exc))
    except msgspec.DecodeError as exc:
        return Invalid("malformed", str(exc))
    except RecursionError:
        return Invalid("malformed", "values nested too deeply")


def _salvage_id(line: bytes) -> RequestId:
    """The id of a request that failed validation, when the line is an object with one."""
    salvaged = decode_json(_id_decoder, line)
    return None if isinstance(salvaged, Invalid) else salvaged.id


def decode_request(line: bytes) -> RunRequest | ErrorReply:
    """Parse one line (without its newline) into a request or a typed error."""
    request = decode_json(_request_decoder, line)
    if isinstance(request, Invalid):
        if request.kind == "invalid":
            refusal = ProtocolError("bad_request", f"invalid request: {request.message}")
            return refusal.reply(_salvage_id(line))
        return ProtocolError("bad_request", f"malformed JSON: {request.message}").reply(None)
    if request.language not in LANGUAGES:
        return ProtocolError(
            "unsupported_language",
            f"unsupported language {request.language!r}; expected one of {', '.join(LANGUAGES)}",
        ).reply(request.id)
    return request


def encode(message: RunResult | ErrorReply) -> bytes:
    """One answer as a JSON line, newline included."""
    return _encoder.encode(message) + b"\n"


class LineTooLong(Exception):
    """The peer sent more than the line cap without a newline."""


class LineBuffer:
    """Splits a byte stream into lines, refusing any line longer than ``max_line``.

    Empty lines (blank or whitespace only) are skipped, so ``\\r\\n`` endings and
    keep-alive newlines do no harm.
    """

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        lines: list[bytes] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            if end - start > self._max_line:
                raise LineTooLong
            line = bytes(self._buffer[start:end]).strip()
            if line:
                lines.append(line)
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self._max_line:
            raise LineTooLong
        return lines

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held back."""
        return len(self._buffer)
