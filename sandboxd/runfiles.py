"""`sandboxd run --file F --out DIR`: the files a request sends, and saving the images
and files a result brings back.

Returned names come from the run (it chose what to write under /tmp/out), so each
must pass inputfiles.name_problem before it is written, and is opened without
following a symlink planted in DIR and without replacing a file already there (a
run could otherwise name `.bashrc` or any file the user keeps in DIR).
"""

from __future__ import annotations

import base64
import binascii
import os

from sandboxd.inputfiles import name_problem


class RunFilesError(Exception):
    """A file to send cannot be read, or a returned one cannot be saved."""


def request_files(paths: list[str]) -> dict[str, str]:
    """The `files` field: each path's contents in base64, under its base name."""
    files: dict[str, str] = {}
    for path in paths:
        name = os.path.basename(path)
        if name in files:
            raise RunFilesError(f"--file {path}: another file is also named {name!r}")
        try:
            with open(path, "rb") as handle:
                files[name] = base64.b64encode(handle.read()).decode()
        except OSError as error:
            raise RunFilesError(f"--file {path}: {error.strerror}") from error
    return files


def save(answer: dict[str, object], directory: str) -> list[str]:
    """Write the answer's images and files into directory; the paths written."""
    os.makedirs(directory, exist_ok=True)
    written: list[str] = []
    for field in ("images", "files"):
        entries = answer.get(field) or []
        assert isinstance(entries, list)
        for entry in entries:
            name, data = str(entry.get("name", "")), str(entry.get("base64", ""))
            problem = name_problem(name)
            if problem is not None:
                raise RunFilesError(f"returned {field} name {name[:80]!r} {problem}")
            try:
                content = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as error:
                raise RunFilesError(f"returned {field} {name!r}: not base64") from error
            path = os.path.join(directory, name)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            try:
                fd = os.open(path, flags, 0o644)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(content)
            except OSError as error:
                raise RunFilesError(f"cannot write {path}: {error.strerror}") from error
            written.append(path)
    return written
