"""The native protocol: NDJSON framing, request validation and result encoding.

Sans-IO (h11's habit): everything here takes bytes or structs and returns bytes
or structs, so every edge case is a unit test without a socket.

One JSON object per line. A request that fails to parse or validate gets an
ErrorReply naming the field and the connection stays usable; a line longer than
the cap gets ``too_large`` and the connection is closed by the caller.
"""

from __future__ import annotations

from typing import Annotated, Literal

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


class ErrorDetail(msgspec.Struct, frozen=True):
    code: ErrorCode
    message: str


class ErrorReply(msgspec.Struct, frozen=True):
    id: RequestId
    error: ErrorDetail


class ProtocolError(Exception):
    """An error that becomes an ErrorReply; raised where a request cannot proceed."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message

    def reply(self, request_id: RequestId) -> ErrorReply:
        return ErrorReply(id=request_id, error=ErrorDetail(code=self.code, message=self.message))


_request_decoder = msgspec.json.Decoder(RunRequest)
_encoder = msgspec.json.Encoder()


class _IdOnly(msgspec.Struct):
    id: RequestId = None


_id_decoder = msgspec.json.Decoder(_IdOnly)


def _salvage_id(line: bytes) -> RequestId:
    """The id of a request that failed validation, when the line is an object with one."""
    try:
        return _id_decoder.decode(line).id
    except msgspec.DecodeError:  # ValidationError is a DecodeError
        return None


def decode_request(line: bytes) -> RunRequest | ErrorReply:
    """Parse one line (without its newline) into a request or a typed error."""
    try:
        request = _request_decoder.decode(line)
    except msgspec.ValidationError as exc:
        return ProtocolError("bad_request", f"invalid request: {exc}").reply(_salvage_id(line))
    except msgspec.DecodeError as exc:
        return ProtocolError("bad_request", f"malformed JSON: {exc}").reply(None)
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
