"""The request's `files`: names checked and contents decoded before a job exists.

A name is one plain path component written into the run's working directory:
not empty, no "/", not "." or "..", no NUL, at most MAX_NAME_BYTES of UTF-8. At
most MAX_FILES files and MAX_TOTAL_BYTES decoded bytes in all. Anything else is a
bad_request naming the field.
"""

from __future__ import annotations

import binascii

from sandboxd.protocol import ProtocolError

MAX_FILES = 32
MAX_NAME_BYTES = 255
MAX_TOTAL_BYTES = 8 * 1024 * 1024


def name_problem(name: str) -> str | None:
    """Why `name` is not one plain file name, or None when it is."""
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains NUL"
    if "/" in name:
        return "contains '/' (absolute or nested names are not allowed)"
    if name in (".", ".."):
        return "is a directory reference"
    if len(name.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def decode(files: dict[str, str]) -> dict[str, bytes]:
    """The files as bytes by name; ProtocolError("bad_request") naming `files` otherwise."""
    if len(files) > MAX_FILES:
        raise ProtocolError("bad_request", f"files: more than {MAX_FILES} files")
    decoded: dict[str, bytes] = {}
    total = 0
    for name, text in files.items():
        problem = name_problem(name)
        if problem is not None:
            raise ProtocolError("bad_request", f"files: the name {name[:80]!r} {problem}")
        try:
            data = binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError("bad_request", f"files.{name}: not base64 ({exc})") from exc
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise ProtocolError("bad_request", f"files: more than {MAX_TOTAL_BYTES} bytes in all")
        decoded[name] = data
    return decoded
