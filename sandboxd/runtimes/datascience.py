"""Data-science support of the python3 runtime: warm modules, files in, figures and files out.

Warm modules ([python3] warm_modules) are imported by the zygote, as root, from the
jail's own dependency environment (never the daemon's venv), before any worker is
forked: the admin chose these packages, so their import-time code is trusted like
the zygote itself. No caller-supplied code runs before isolation (invariant 2).
BLAS and OpenMP pools are pinned to one thread so the zygote stays single-threaded
and every fork is safe; each run is a fresh fork, so rcParams, pandas options and
numpy's error state a run changes die with it.

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
import shutil
import stat
import sys
import tempfile

import msgspec

from sandboxd.artifacts import MAX_ARTIFACTS, Artifact, Trailer
from sandboxd.jail import JailSpec, libc

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

# Run in the zygote right after a warm module is imported, so that what the library
# does lazily on first use (matplotlib's first draw and font loading, pandas'
# groupby and CSV machinery) is done once instead of in every run. Ours, trusted like
# the modules. matplotlib's font cache is emptied afterwards: its fonts hold open
# files, and a worker keeps no fd of the zygote's.
WARM_UP = {
    "numpy": "import numpy\n(numpy.arange(4.0) @ numpy.ones(4)).item()\n",
    "pandas": (
        "import io, pandas\n"
        "frame = pandas.read_csv(io.StringIO('a,b\\n1,2\\n1,3\\n'))\n"
        "frame.groupby('a')['b'].sum().to_json()\n"
        "repr(frame)\n"
    ),
    "matplotlib.pyplot": (
        "import io, matplotlib.pyplot, matplotlib.font_manager\n"
        "matplotlib.pyplot.plot([1, 2], [2, 1])\n"
        "matplotlib.pyplot.title('warm')\n"
        "matplotlib.pyplot.savefig(io.BytesIO(), format='png')\n"
        "matplotlib.pyplot.close('all')\n"
        "matplotlib.font_manager._get_font.cache_clear()\n"
    ),
}

# Where a run writes files it wants back; its working directory is /tmp.
OUTPUT_DIR = "/tmp/out"
WORK_DIR = "/tmp"


_trailer_encoder = msgspec.json.Encoder()


def prepare_zygote(spec: JailSpec, scratch: str) -> list[str]:
    """Expose the jail's environment, then import the warm modules; problems as lines."""
    site = spec.python_site_packages
    targets = [e.target for e in spec.roots.get("python3", []) if e.path == site and e.target]
    if site is None or not targets or not spec.python_warm_modules:
        return []
    try:
        expose(site, targets[0], scratch)
    except OSError as exc:
        return [f"environment not exposed in the zygote, nothing warmed: {exc}"]
    return warm(spec.python_path, spec.python_warm_modules)


def expose(source: str, target: str, scratch: str) -> None:
    """In the zygote's own mount namespace, show host directory `source` at `target`,
    the path where the jail sees it, so warm modules carry the jail's paths (__file__,
    matplotlib's data and font paths). A missing target is made in an overlay on its
    nearest existing ancestor, upper layer on a tmpfs at `scratch`: the host's
    filesystem is not written."""
    if not os.path.isdir(target):
        anchor = os.path.dirname(target)
        while not os.path.isdir(anchor):
            anchor = os.path.dirname(anchor)
        if anchor == "/":
            raise OSError(f"no directory to lay an overlay on for {target}")
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        libc.mount("tmpfs", scratch, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0700")
        for layer in ("upper", "work"):
            os.mkdir(os.path.join(scratch, layer))
        options = f"lowerdir={anchor},upperdir={scratch}/upper,workdir={scratch}/work"
        libc.mount("overlay", anchor, "overlay", 0, options)
        os.makedirs(target)
    libc.mount(source, target, None, libc.MS_BIND | libc.MS_REC)


def warm(python_path: list[str], modules: list[str]) -> list[str]:
    """Import `modules` in the zygote with the jail's sys.path only (expose() put the
    environment at its jail path); returns one line per module that failed to import
    (modules that are not installed are skipped silently)."""
    if not modules:
        return []
    saved_path = sys.path[:]
    saved_env = dict(os.environ)
    cache = tempfile.mkdtemp(prefix="sandboxd-warm-")
    os.environ.update(ENVIRONMENT)
    os.environ["MPLCONFIGDIR"] = cache
    sys.path[:] = python_path
    sys.path_importer_cache.clear()
    problems: list[str] = []
    fds = set(os.listdir("/proc/self/fd"))
    try:
        for name in modules:
            try:
                __import__(name)
                exec(WARM_UP.get(name, ""), {})
            except ModuleNotFoundError as exc:
                if exc.name is None or name.split(".")[0] != exc.name.split(".")[0]:
                    problems.append(f"{name}: {exc}")
            except Exception as exc:
                problems.append(f"{name}: {exc!r}")
    finally:
        sys.path[:] = saved_path
        sys.path_importer_cache.clear()
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(cache, ignore_errors=True)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        problems.append(f"the warm modules left {threads} threads in the zygote")
    left_open = set(os.listdir("/proc/self/fd")) - fds
    if left_open:
        problems.append(f"the warm modules left fds {sorted(left_open)} open in the zygote")
    return problems


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
