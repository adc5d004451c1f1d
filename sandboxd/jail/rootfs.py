"""The read-only root a worker lives in.

python_entries(), node_entries(): in the daemon, once: which host paths a language's
root holds
(the runtime, the shared libraries it links, tz data, dependencies).
build(): in the zygote's private mount namespace, once: a tmpfs with those
paths bind-mounted read-only, a minimal /dev and /etc, then made read-only.
prebuild(): in the zygote, once per root: a mount namespace already pivoted into
that root with the old root detached, so it holds that root's mounts and nothing
else (the host's root is not in it at all: no directory fd, whoever opened it,
leads to the host by fchdir and `..`, as it would after chroot alone); pinned by
an nsfs fd.
enter(): in each worker: setns into its root's prebuilt namespace, close every
prebuilt namespace's fd, unshare a private copy of it, and mount a private
size-capped tmpfs on /tmp there. A copy of its root's mounts alone is cheaper than
a copy of the zygote's whole namespace (every root) detached again in every worker.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Hashable, Iterable

from sandboxd.jail import RootEntry, hostscan, libc

# Device nodes a run may open (invariant 5).
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")

# POSIX shared memory and semaphores (shm_open, sem_open: multiprocessing's locks)
# live in /dev/shm; in every root it leads to the worker's own /tmp, so they are
# private to the run and inside the /tmp size cap.
SHM_LINK = ("/dev/shm", "../tmp")

# Host directories a python3 root holds when they exist (stdlib comes from sysconfig).
PYTHON_DATA_DIRS = ("/usr/share/zoneinfo",)

# The system's TLS trust store (public certificates and OpenSSL's config, never
# /etc/ssl/private): Python's ssl module and Debian's node use it for https when a
# run has network. Bound into every root where present.
TLS_TRUST: tuple[RootEntry, ...] = (
    RootEntry("/etc/ssl/certs", "dir"),
    RootEntry("/usr/share/ca-certificates", "dir"),
    RootEntry("/etc/ssl/openssl.cnf", "file"),
    RootEntry("/usr/lib/ssl", "dir"),  # symlinks into /etc/ssl
)

# Small files written into every root; no host /etc is visible.
ETC_FILES: dict[str, bytes] = {
    "/etc/passwd": b"root:x:0:0:root:/:/bin/false\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "/etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    "/etc/hosts": b"127.0.0.1 localhost\n::1 localhost\n",
    "/etc/hostname": b"sandbox\n",
    "/etc/nsswitch.conf": b"passwd: files\ngroup: files\nhosts: files dns\n",
}
# Merged-/usr layout of Debian 12: these are symlinks into /usr in every root.
USR_SYMLINKS = {"/lib": "usr/lib", "/lib64": "usr/lib64", "/bin": "usr/bin", "/sbin": "usr/sbin"}

_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")

RO_FLAGS = libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV


def shared_libraries(binaries: Iterable[str]) -> set[str]:
    """Every shared library (and the loader) the given ELF files link, via ldd; a
    file's answer is kept while nothing it depends on changed (hostscan.PerFile)."""
    return set().union(*_linked(binaries).values())


def _ldd(files: list[str]) -> dict[str, frozenset[str]]:
    """file -> the libraries ldd names for it (nothing for a file that is not ELF).
    ldd runs the loader once per file, so the files of a first scan (hundreds of
    extension modules) are split over one ldd per CPU."""
    width = os.cpu_count() or 1
    size = max(1, -(-len(files) // width))
    batches = [files[i : i + size] for i in range(0, len(files), size)]
    found: dict[str, frozenset[str]] = {}
    with contextlib.ExitStack() as stack:
        running = [(batch, stack.enter_context(_start_ldd(batch))) for batch in batches]
        for batch, process in running:
            out, _ = process.communicate()
            found.update(_ldd_answers(batch, out))
    return found


def _start_ldd(files: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ldd", *files],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={"LC_ALL": "C"},
    )


def _ldd_answers(files: list[str], out: str) -> dict[str, frozenset[str]]:
    """Split ldd's output per file: with several files it heads each one's lines with
    its name and a colon, in the order given."""
    answers: dict[str, set[str]] = {path: set() for path in files}
    heads = iter(files)
    current = next(heads) if len(files) == 1 else None
    expected = next(heads, None)
    for line in out.splitlines():
        if expected is not None and line == expected + ":":
            current, expected = expected, next(heads, None)
        elif current is not None:
            answers[current].update(m.group(1) for m in _LDD_PATH.finditer(line))
    return {path: frozenset(libs) for path, libs in answers.items()}


_linked = hostscan.PerFile(_ldd)


def _file_entries(paths: Iterable[str]) -> list[RootEntry]:
    """Files at the path the loader looks them up by, with their directory resolved."""
    entries = []
    for path in sorted(set(paths)):
        directory = os.path.realpath(os.path.dirname(path))
        entries.append(RootEntry(os.path.join(directory, os.path.basename(path)), "file"))
    return entries


def _python_scan(extra_dirs: dict[str, str] | None = None) -> Hashable:
    """What python_entries' answer depends on besides the host's packages."""
    return hostscan.directories(extra_dirs or {})


@hostscan.memoized(_python_scan)
def python_entries(extra_dirs: dict[str, str] | None = None) -> list[RootEntry]:
    """The host's python3 installation (not the daemon's venv), its libraries and data,
    and `extra_dirs` (host directory -> path in the jail), e.g. the dependencies."""
    stdlib = sysconfig.get_paths()["stdlib"]
    dynload = os.path.join(stdlib, "lib-dynload")
    interpreter = os.path.realpath(os.path.join(sys.base_prefix, "bin", "python3"))
    extra = list(extra_dirs or {})
    modules = [os.path.join(dynload, n) for n in os.listdir(dynload) if n.endswith(".so")]
    # Compiled packages (numpy, pandas) link host libraries too, e.g. libstdc++.
    modules += _extension_modules(extra)
    dirs = [stdlib, *(d for d in PYTHON_DATA_DIRS if os.path.isdir(d))]
    libs = {
        lib
        for lib in shared_libraries([interpreter, *modules])
        if not any(_is_within(lib, d) for d in [*dirs, *extra])  # bound with their directory
    }
    moved = [RootEntry(path, "dir", target) for path, target in (extra_dirs or {}).items()]
    own = [RootEntry(d, "dir") for d in dirs]
    return own + moved + _tls_trust() + _file_entries([interpreter, *libs])


def _tls_trust() -> list[RootEntry]:
    return [entry for entry in TLS_TRUST if os.path.exists(entry.path)]


def _is_within(path: str, directory: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)


def _extension_modules(directories: Iterable[str]) -> list[str]:
    """Every shared object below the given directories."""
    found: list[str] = []
    for directory in directories:
        for parent, _, names in os.walk(directory):
            found.extend(os.path.join(parent, n) for n in names if ".so" in n)
    return found


def _node_scan(node: str, extra_dirs: dict[str, str] | None = None) -> Hashable:
    """What node_entries' answer depends on besides the host's packages."""
    binary = os.path.realpath(node)
    return binary, hostscan.stamp(binary), hostscan.directories(extra_dirs or {})


@hostscan.memoized(_node_scan)
def node_entries(node: str, extra_dirs: dict[str, str] | None = None) -> list[RootEntry]:
    """The node binary, the libraries it links, the JavaScript files its build loads at
    start-up (externalized builtins), and `extra_dirs` (host -> jail path)."""
    binary = os.path.realpath(node)
    libraries = shared_libraries([binary])
    moved = [RootEntry(path, "dir", target) for path, target in (extra_dirs or {}).items()]
    builtins = externalized_builtins(binary, libraries)
    return moved + _tls_trust() + _file_entries([binary, *libraries, *builtins])


# Distribution builds of node (Debian 12's node 18, with libnode.so) read some of
# node's own JavaScript (acorn, undici, cjs-module-lexer) from their packages at
# start-up instead of embedding it, and abort without them. The build names those
# files in the config it embeds: NODE_SHARED_BUILTIN_<NAME>_PATH=<file>.
_BUILTIN_MARK = b"NODE_SHARED_BUILTIN_"
_BUILTIN_PATH = re.compile(rb"NODE_SHARED_BUILTIN_\w+_PATH=(/[^\"\s\\]+)")
# The embedded config is one blob: its defines lie close to the first mark.
_BUILTIN_SPAN = 1 << 16


def externalized_builtins(binary: str, libraries: Iterable[str]) -> set[str]:
    """The existing builtin files named by a node binary or the libnode it links: the
    files that can hold node's config (ICU data alone is 30 MB more to scan)."""
    found: set[str] = set()
    libnode = [lib for lib in libraries if os.path.basename(lib).startswith("libnode")]
    for path in [binary, *libnode]:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as data:
            start = data.find(_BUILTIN_MARK)
            if start >= 0:
                end = start + _BUILTIN_SPAN
                found.update(m.decode() for m in _BUILTIN_PATH.findall(data, start, end))
    return {path for path in found if os.path.isfile(path)}


def _mount_point(root: str, entry: RootEntry) -> str:
    target = root + (entry.target or entry.path)
    if entry.kind == "dir":
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass
    return target


def _bind_read_only(source: str, target: str, flags: int = RO_FLAGS) -> None:
    libc.mount(source, target, None, libc.MS_BIND | libc.MS_REC)
    libc.mount(source, target, None, flags)


def build(root: str, entries: Iterable[RootEntry], files: dict[str, bytes]) -> None:
    """Assemble a read-only root at `root` (call inside a private mount namespace)."""
    os.makedirs(root, exist_ok=True)
    libc.mount("sandboxd-root", root, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0755,size=16m")
    for link, target in USR_SYMLINKS.items():
        os.makedirs(os.path.join(root, target), exist_ok=True)
        os.symlink(target, root + link)
    for entry in entries:
        _bind_read_only(entry.path, _mount_point(root, entry))
    os.makedirs(root + "/dev")
    os.symlink(SHM_LINK[1], root + SHM_LINK[0])
    for device in DEVICES:
        if os.path.exists(device):
            point = _mount_point(root, RootEntry(device, "file"))
            _bind_read_only(device, point, RO_FLAGS & ~libc.MS_NODEV)
    os.makedirs(root + "/tmp")
    for path, content in {**ETC_FILES, **files}.items():
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        with open(root + path, "wb") as handle:
            handle.write(content)
    libc.mount(
        "sandboxd-root",
        root,
        None,
        libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV,
    )


def prebuild(root: str) -> int:
    """A mount namespace whose root is the built root `root`, its old root detached and
    every mount private; returns an nsfs fd (close-on-exec) that keeps it alive.
    Call in the zygote (single-threaded, in its own private namespace), which comes
    back to its namespace and working directory."""
    home = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    # Opened here: once the old root is detached there is no /proc to open it from.
    proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc.unshare(libc.CLONE_NEWNS)
        try:
            os.chdir(root)
            # With new_root == put_old the old root is stacked on top of the new one
            # at "/", from where it is detached; no directory for it is needed.
            libc.pivot_root(".", ".")
            libc.umount2(".", libc.MNT_DETACH)
            # Already private (the zygote's namespace is); said here so that no mount
            # of a worker's copy can propagate back, whatever the zygote's was.
            libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE)
            return os.open("self/ns/mnt", os.O_RDONLY, dir_fd=proc)
        finally:
            libc.setns(home, libc.CLONE_NEWNS)
            os.fchdir(here)
    finally:
        for fd in (home, here, proc):
            os.close(fd)


def enter(namespace: int, prebuilt: Iterable[int], tmp_size_mb: int, uid: int) -> None:
    """Move into a private copy of the prebuilt mount namespace `namespace` (setns,
    then unshare), with a private /tmp owned by `uid`, and cd to /tmp. Every fd in
    `prebuilt` (all the prebuilt namespaces this process holds) is closed by name as
    soon as the setns is done, so that no later step (contain's closerange) is what
    keeps them from a run."""
    libc.setns(namespace, libc.CLONE_NEWNS)
    for fd in prebuilt:
        os.close(fd)
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount(
        "sandboxd-tmp",
        "/tmp",
        "tmpfs",
        libc.MS_NOSUID | libc.MS_NODEV,
        f"size={tmp_size_mb}m,mode=0700,uid={uid},gid={uid},nr_inodes=16k",
    )
    os.chdir("/tmp")
