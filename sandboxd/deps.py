"""Dependency environments: the packages sandboxed code can import.

The python3 environment lives under the state directory as
`python/current/site-packages` (bound read-only into the jail); what it holds
is read from the distributions' own metadata, never from a list of ours.
"""

from __future__ import annotations

import importlib.metadata

from sandboxd.jobs import Dependency


def installed_python(site_packages: str | None) -> list[Dependency]:
    """Name and version of every distribution in the jail's site-packages."""
    if site_packages is None:
        return []
    found = {
        dist.metadata["Name"]: dist.version
        for dist in importlib.metadata.distributions(path=[site_packages])
    }
    return [Dependency(name, version) for name, version in sorted(found.items())]
