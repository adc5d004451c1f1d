"""The daemon's scans of the host for jail roots, kept for the process's lifetime.

Which host paths a root holds (rootfs.python_entries, rootfs.node_entries,
debianpy.root_entries) changes only when the host's packages change, yet building a
generation asked dpkg, walked the package trees and ran ldd again on every reload:
seconds here, minutes under emulation. Two caches answer a repeated scan instead:

memoized(key): a scan's root entries, scanned again when `key` of its arguments
changes, when packages() changes (apt install, remove or upgrade rewrites dpkg's
status file; a library installed anywhere the loader looks rewrites its cache), or
when an entry it returned no longer exists.
PerFile: a scan of single files that name other files (ldd: the libraries a module
links), each file's answer kept while the file, the loader's cache and every file it
named are unchanged, so after a change only the files it touched are scanned again.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import ParamSpec

from sandboxd.jail import RootEntry

# (device, inode, mtime in ns, size) of a file, links followed.
Stamp = tuple[int, int, int, int]

DPKG_STATUS = "/var/lib/dpkg/status"
LOADER_CACHE = "/etc/ld.so.cache"

# Results kept per memoized scan (distinct keys: profiles, synced environments).
SCANS_KEPT = 8
# Files PerFile keeps; past it (after many syncs of the environment) it starts afresh.
FILES_KEPT = 20_000

_P = ParamSpec("_P")


def stamp(path: str) -> Stamp | None:
    """What tells a changed file from the same one; None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def directories(moved: Mapping[str, str]) -> Hashable:
    """Directories bound into a root (host path -> path in the jail) with their stamps:
    a synced environment is never changed once built, a new one is a new directory."""
    return tuple((path, target, stamp(path)) for path, target in sorted(moved.items()))


def packages() -> tuple[Stamp | None, Stamp | None]:
    """The host's installed packages and the loader's library cache, as stamps."""
    return stamp(DPKG_STATUS), stamp(LOADER_CACHE)


def memoized(
    key: Callable[_P, Hashable],
) -> Callable[[Callable[_P, list[RootEntry]]], Callable[_P, list[RootEntry]]]:
    """Keep a scan's entries (see the module's docstring); callers get a copy."""

    def decorate(scan: Callable[_P, list[RootEntry]]) -> Callable[_P, list[RootEntry]]:
        kept: dict[Hashable, list[RootEntry]] = {}
        lock = threading.Lock()  # a reload and the update route may build at once

        @functools.wraps(scan)
        def memo(*args: _P.args, **kwargs: _P.kwargs) -> list[RootEntry]:
            state = (packages(), key(*args, **kwargs))
            with lock:
                entries = kept.pop(state, None)
                if entries is None or not all(os.path.lexists(e.path) for e in entries):
                    entries = scan(*args, **kwargs)
                kept[state] = entries  # the most recent last
                while len(kept) > SCANS_KEPT:
                    del kept[next(iter(kept))]
                return list(entries)

        return memo

    return decorate


class PerFile:
    """Answers of `scan` (files -> the files each one names) kept per file."""

    def __init__(self, scan: Callable[[list[str]], dict[str, frozenset[str]]]) -> None:
        self._scan = scan
        self._lock = threading.Lock()
        # file -> (its stamp, the loader cache's, its answer with the named files' stamps)
        self._kept: dict[str, tuple[Stamp, Stamp | None, dict[str, Stamp | None]]] = {}

    def __call__(self, files: Iterable[str]) -> dict[str, frozenset[str]]:
        """Each of `files` that exists -> the files it names."""
        with self._lock:
            return self._answers(files)

    def _answers(self, files: Iterable[str]) -> dict[str, frozenset[str]]:
        loader = stamp(LOADER_CACHE)
        found: dict[str, frozenset[str]] = {}
        stamps: dict[str, Stamp] = {}
        for path in sorted(set(files)):
            own = stamp(path)
            if own is None:
                continue
            kept = self._kept.get(path)
            if kept is not None and kept[:2] == (own, loader) and _unchanged(kept[2]):
                found[path] = frozenset(kept[2])
                continue
            stamps[path] = own
        if len(self._kept) + len(stamps) > FILES_KEPT:
            self._kept.clear()
        if stamps:
            scanned = self._scan(sorted(stamps))
            for path, own in stamps.items():
                names = scanned.get(path, frozenset())
                self._kept[path] = (own, loader, {name: stamp(name) for name in names})
                found[path] = names
        return found


def _unchanged(named: dict[str, Stamp | None]) -> bool:
    return all(stamp(path) == before for path, before in named.items())
