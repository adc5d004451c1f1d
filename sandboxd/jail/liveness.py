"""Whether the daemon a leftover names is still alive.

Every host object a daemon makes carries its pid in the name (v1 cgroups
`sandboxd.<pid>`, scopes `sandboxd-pool-<pid>-<n>.scope`, egress links, nft tables
and namespace files), so a daemon killed with SIGKILL can be cleaned up after by
the next one. Several daemons may share a host: an object is only removed when
its pid is not a live sandboxd process, and never our own live objects.
"""

from __future__ import annotations

import os


def daemon_alive(pid: int) -> bool:
    """True while `pid` is a running sandboxd other than this process.

    Our own pid counts as dead: at start-up nothing is ours yet, so anything named
    after it was left by an earlier daemon that had the same pid."""
    if pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # unreadable: assume a neighbour, never remove its objects
    # A zombie has an empty command line; it is dead as a daemon.
    return b"sandboxd" in cmdline
