"""Data-science support in the python3 worker: its record (RUNTIME: a python3 runtime
whose template has [python3] warm_modules imported), its environment, files in,
figures and files out (the warm template itself is template.py).

Outputs travel in the run's stdout, which the daemon reads and caps: after the
code, the worker appends a trailer starting with a per-job random boundary the
daemon chose (artifacts.py splits it). User code can print the boundary itself and
forge images or files (they are its output); it cannot forge a verdict, which the
daemon takes from the kernel only.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import sys
from collections.abc import Mapping
from importlib.machinery import PathFinder
from typing import TYPE_CHECKING

import msgspec

from sandboxd import profiles
from sandboxd.artifacts import MAX_ARTIFACTS, Artifact, Trailer
from sandboxd.jail import RuntimeJail
from sandboxd.runtimes import Runtime

if TYPE_CHECKING:
    from sandboxd.config import Config

# The environment both the zygote (while importing) and every worker get: one BLAS or
# OpenMP thread (a forked child keeps only the forking thread, so pools must not
# exist at fork time), matplotlib without a display and with a writable cache.
ENVIRONMENT = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    "MPLCONFIGDIR": "/tmp/.matplotlib",
}

# Where a run writes files it wants back; its working directory is /tmp.
OUTPUT_DIR = "/tmp/out"
WORK_DIR = "/tmp"


_trailer_encoder = msgspec.json.Encoder()


def warm_modules(config: Config) -> list[str]:
    """[python3] warm_modules as a list."""
    return [m.strip() for m in config.python3.warm_modules.split(",") if m.strip()]


def installed(modules: list[str], site: str | None, packaged: list[str]) -> list[str]:
    """The `modules` whose top-level package a data-science jail can import: from the
    synced environment (host directory `site`) or among Debian's bound top-level paths
    (`packaged`, e.g. .../dist-packages/numpy); none means no data-science pool."""
    bound = {os.path.basename(path).split(".")[0] for path in packaged}

    def found(top: str) -> bool:
        synced = site is not None and PathFinder.find_spec(top, [site]) is not None
        return synced or top in bound

    return [name for name in modules if found(name.split(".")[0])]


def jail(config: Config, built: Mapping[str, RuntimeJail]) -> RuntimeJail | None:
    """The python3 jail plus Debian's numpy, pandas and matplotlib (debianpy's "science"
    profile, bound into this runtime's root only), with the warm modules imported in a
    template of its own; not served when none of the warm modules is installed (bound
    or in the synced environment, whose versions come first on sys.path)."""
    from sandboxd import debianpy

    python = built.get("python3")
    if python is None:
        return None
    science = [e for e in debianpy.root_entries(profiles.SCIENCE) if e not in python.entries]
    prefix = debianpy.DIST_PACKAGES + "/"
    packaged = [*python.packaged, *(e.path for e in science if e.path.startswith(prefix))]
    modules = installed(warm_modules(config), python.environment, packaged)
    if not modules:
        return None
    # Debian's dist-packages last: behind the synced environment, present even when
    # the python3 profile binds nothing of it.
    path = [p for p in python.path if p != debianpy.DIST_PACKAGES]
    if packaged:
        path.append(debianpy.DIST_PACKAGES)
    return msgspec.structs.replace(
        python,
        entries=[*python.entries, *science],
        path=path,
        packaged=packaged,
        warm_modules=modules,
        template=True,
    )


def _claims(sources: tuple[str, ...], jail: RuntimeJail) -> bool:
    return profiles.imports_any(sources, jail.warm_modules)


def _enabled(config: Config) -> bool:
    return bool(warm_modules(config))


RUNTIME = Runtime(
    name=profiles.SCIENCE,
    language="python3",
    runner="python3",
    seccomp_policy="python3",
    section="python3",
    jail=jail,
    pool_divisor=2,
    claims=_claims,
    enabled=_enabled,
)


def write_inputs(files: dict[str, bytes]) -> None:
    """Write the request's files into the working directory (names were checked)."""
    os.makedirs(OUTPUT_DIR, exist_ok=True)
    for name, data in files.items():
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(os.path.join(WORK_DIR, name), flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def _figures(max_count: int) -> list[Artifact]:
    """Every open matplotlib figure as PNG, when pyplot is in use."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    images: list[Artifact] = []
    for number in pyplot.get_fignums()[:max_count]:
        buffer = io.BytesIO()
        pyplot.figure(number).savefig(buffer, format="png")
        data = base64.b64encode(buffer.getvalue()).decode()
        images.append(Artifact(f"figure-{number}.png", "image/png", data))
    return images


def _outputs(max_count: int) -> list[Artifact]:
    """Regular files directly under OUTPUT_DIR (read inside the jail, links not followed)."""
    try:
        names = sorted(os.listdir(OUTPUT_DIR))
    except OSError:
        return []
    files: list[Artifact] = []
    for name in names[:max_count]:
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
            fd = os.open(os.path.join(OUTPUT_DIR, name), flags)
        except OSError:
            continue
        try:
            if not _is_regular(fd):
                continue
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read()
        finally:
            os.close(fd)
        files.append(Artifact(name, "application/octet-stream", base64.b64encode(data).decode()))
    return files


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def trailer(boundary: str) -> bytes:
    """What the worker appends to stdout after the code: boundary, then one JSON line
    (one more entry than the daemon accepts, so it can tell that some were left out)."""
    body = Trailer(images=_figures(MAX_ARTIFACTS + 1), files=_outputs(MAX_ARTIFACTS + 1))
    if not body.images and not body.files:
        return b""
    return boundary.encode() + _trailer_encoder.encode(body) + b"\n"


def before_code() -> None:
    """In the worker, right before the code: plt.show() on Agg keeps figures quietly."""
    import warnings

    warnings.filterwarnings("ignore", message=".*non-interactive.*cannot be shown")


def after_code(boundary: str) -> None:
    """In the worker at exit (an atexit hook): the code's output first, then the trailer.
    A figure that fails to render is reported on stderr; the exit code stays the code's."""
    try:
        sys.stdout.flush()
        data = trailer(boundary)
    except Exception as exc:
        print(f"sandboxd: figures and files could not be returned: {exc!r}", file=sys.stderr)
        return
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]
