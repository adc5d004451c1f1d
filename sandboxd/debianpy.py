"""Debian's packaged Python modules in a jail: offline defaults without pip.

A profile names Debian packages (a table below). At start-up, and on a reload
after the host's packages changed (jail/hostscan.py), the daemon asks dpkg which
of them are installed, follows their python3-* dependencies, and binds read-only
into the jail only what those packages own directly under
/usr/lib/python3/dist-packages (module directories, single-file modules, their
.egg-info/.dist-info), at the same path, plus the shared libraries their
extension modules link, the profile's data paths (DATA) and the targets of the
symlinks in all of these. The rest of dist-packages (the
daemon's own pystemd, seccomp, ...) does not exist in the jail.

The "python3" profile is in every python3 jail; the "science" profile only in the
data-science pools' (runtimes/template.py). The synced environment (`sandboxd deps
sync`) comes first on sys.path, so a newer version installed there shadows Debian's.
Trust: the admin chose these packages by installing them; the science profile's
import-time code runs as root in the data-science template before any user code.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Hashable, Iterable

from sandboxd.jail import RootEntry, hostscan, rootfs

DIST_PACKAGES = "/usr/lib/python3/dist-packages"

# Profile -> the Debian packages its jail sees (with their python3-* dependencies).
PROFILES: dict[str, tuple[str, ...]] = {
    # What Dify's templates and users' code nodes import: jinja2 (the jinja2
    # language), requests and httpx (HTTP calls through the proxy).
    "python3": ("python3-jinja2", "python3-requests", "python3-httpx"),
    # The data-science pools' warm modules ([python3] warm_modules): numpy links
    # libblas3/liblapack3 (OpenBLAS), matplotlib pulls in python3-pil and its image
    # libraries; all found by dpkg and ldd, none listed here. python3-fonttools'
    # Depends bring python3-sympy and python3-scipy (first of "scipy | munkres"):
    # neither warm module imports them (matplotlib uses fontTools for PDF/PS font
    # subsetting only), but runs of these pools import them, so they stay; with the
    # scans kept (jail/hostscan.py) their cost is paid at start, not on every reload.
    "science": ("python3-numpy", "python3-pandas", "python3-matplotlib"),
}

# Profile -> host paths outside dist-packages its packages read at run time, bound
# when they exist.
DATA: dict[str, tuple[str, ...]] = {
    # python-matplotlib-data: mpl-data (fonts, style sheets, the default
    # matplotlibrc), and /etc/matplotlibrc, the admin's, which Debian's matplotlib
    # reads first.
    "science": ("/usr/share/matplotlib", "/etc/matplotlibrc"),
}

_DEPENDENCY = re.compile(r"^\s*([a-z0-9][a-z0-9.+-]*)")


def _dpkg_query(*args: str) -> str:
    """dpkg-query's output; packages it does not know are left out (it says so on stderr)."""
    return subprocess.run(
        ["dpkg-query", *args],
        capture_output=True,
        text=True,
        check=False,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
    ).stdout


_DEPENDS_FORMAT = "${Package}\t${db:Status-Abbrev}\t${Depends}\n"


def _installed_depends(packages: Iterable[str]) -> dict[str, str]:
    """package -> its Depends field, for each of `packages` that is installed."""
    names = sorted(set(packages))
    found = {}
    for line in _dpkg_query("-W", "-f", _DEPENDS_FORMAT, *names).splitlines() if names else []:
        package, status, depends = [*line.split("\t"), "", ""][:3]
        if status.startswith("ii"):
            found[package] = depends
    return found


def _python_dependencies(depends: str) -> set[str]:
    """The python3-* packages a Depends field names (every alternative of a choice)."""
    names = set()
    for clause in depends.split(","):
        for alternative in clause.split("|"):
            match = _DEPENDENCY.match(alternative)
            if match and match[1].startswith("python3-"):
                names.add(match[1])
    return names


def installed_closure(packages: Iterable[str]) -> list[str]:
    """The installed ones of `packages` and of their python3-* dependencies, recursively."""
    seen: set[str] = set()
    wanted = set(packages)
    while wanted:
        found = _installed_depends(wanted)
        seen |= found.keys()
        # A dependency that is not installed is simply not found on the next round.
        wanted = set().union(*map(_python_dependencies, found.values())) - seen
    return sorted(seen)


def owned_top_level(packages: Iterable[str]) -> list[str]:
    """Host paths directly under DIST_PACKAGES that the packages' file lists name."""
    names = sorted(set(packages))
    if not names:
        return []
    out = _dpkg_query("-L", *names)
    prefix = DIST_PACKAGES + "/"
    tops = {
        line[len(prefix) :].split("/", 1)[0] for line in out.splitlines() if line.startswith(prefix)
    }
    # __pycache__ at the top holds other packages' bytecode too: single-file
    # modules compile in memory instead. .pth files are never read by the jail.
    tops -= {"__pycache__"}
    paths = (os.path.join(DIST_PACKAGES, top) for top in sorted(tops) if not top.endswith(".pth"))
    return [path for path in paths if os.path.lexists(path) and not os.path.islink(path)]


def link_targets(paths: Iterable[str]) -> list[str]:
    """What the symlinks in and below `paths` point to, outside `paths`: the target
    of each link (its directory resolved, at the path the link names), when it exists."""
    roots = [os.path.realpath(path) for path in paths]

    def inside(path: str) -> bool:
        return any(path == root or path.startswith(root + "/") for root in roots)

    targets = set()
    for path in paths:
        links = [path] if os.path.islink(path) else []
        for parent, dirs, files in os.walk(path):  # nothing for a file
            links.extend(os.path.join(parent, name) for name in dirs + files)
        for link in filter(os.path.islink, links):
            named = os.path.join(os.path.dirname(link), os.readlink(link))
            target = os.path.join(os.path.realpath(os.path.dirname(named)), os.path.basename(named))
            if os.path.exists(target) and not inside(os.path.realpath(target)):
                targets.add(target)
    return sorted(targets)


def _profile_scan(profile: str) -> Hashable:
    """What root_entries' answer depends on besides the host's packages (the files
    under dist-packages change only with dpkg's status: Debian's pip installs under
    /usr/local)."""
    data = DATA.get(profile, ())
    return profile, PROFILES.get(profile, ()), data, tuple(map(os.path.exists, data))


@hostscan.memoized(_profile_scan)
def root_entries(profile: str) -> list[RootEntry]:
    """What a profile's jail root needs for its Debian packages: their top-level paths,
    its data paths, the targets of the links in them, and the host libraries their
    extension modules link."""
    paths = owned_top_level(installed_closure(PROFILES.get(profile, ())))
    if paths:
        paths += [path for path in DATA.get(profile, ()) if os.path.exists(path)]
    paths += link_targets(paths)
    entries = [RootEntry(path, "dir" if os.path.isdir(path) else "file") for path in paths]
    modules = [path for path in paths if path.endswith(".so")]
    for path in paths:
        for parent, _, files in os.walk(path):  # nothing for a file
            modules.extend(os.path.join(parent, name) for name in files if ".so" in name)
    # The libraries' directory resolved and the name kept: the loader looks them up by it.
    linked = {
        os.path.join(os.path.realpath(os.path.dirname(lib)), os.path.basename(lib))
        for lib in rootfs.shared_libraries(modules)
    }
    outside = sorted(lib for lib in linked if not lib.startswith(DIST_PACKAGES + "/"))
    return entries + [RootEntry(lib, "file") for lib in outside]
