"""Images and files a run returns, and how the daemon splits them off its stdout.

The worker appends them after the code's output as a trailer: the job's boundary
(random, chosen by the daemon for that job) followed by one JSON line (a Trailer).
The trailer is part of stdout, so it counts against the output cap like any other
byte. The daemon splits at the last boundary; a trailer cut by the cap, or one that
is not valid, is dropped and the result is marked truncated.
"""

from __future__ import annotations

import secrets

import msgspec

# Images or files returned per run, at most (each list); more set the truncated flag.
MAX_ARTIFACTS = 16


class Artifact(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One returned image or file, its bytes in base64."""

    name: str
    mime: str
    base64: str


class Trailer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    images: list[Artifact] = []
    files: list[Artifact] = []


class Split(msgspec.Struct, frozen=True):
    stdout: bytes
    images: list[Artifact]
    files: list[Artifact]
    # The trailer was cut, invalid or over MAX_ARTIFACTS.
    truncated: bool


_trailer_decoder = msgspec.json.Decoder(Trailer)


def new_boundary() -> str:
    """A per-job marker user code cannot guess before it runs."""
    return f"\x00sandboxd-artifacts-{secrets.token_hex(16)}\x00"


def split(stdout: bytes, boundary: str) -> Split:
    """The code's own output, and the images and files after the last boundary."""
    marker = boundary.encode()
    at = stdout.rfind(marker) if marker else -1
    if at < 0:
        return Split(stdout, [], [], False)
    body = stdout[at + len(marker) :]
    try:
        trailer = _trailer_decoder.decode(body)
    except msgspec.DecodeError:
        return Split(stdout[:at], [], [], True)
    over = len(trailer.images) > MAX_ARTIFACTS or len(trailer.files) > MAX_ARTIFACTS
    return Split(stdout[:at], trailer.images[:MAX_ARTIFACTS], trailer.files[:MAX_ARTIFACTS], over)
