"""The python3 runtime: a forked zygote child runs one job as `__main__` and exits.

User code shares this interpreter and can rewrite anything in it, so nothing
here reports an outcome: the exit status is read by the daemon with wait4.

User code sees only its own modules (DESIGN.md invariant 16): the zygote ran without
site (zygote.command), prepare() sets sys.path to the jail's (the stdlib and the
dependency environment), and once the job is read, forget_bootstrap() removes from
sys.modules every module that is neither the standard library's nor the jail
environment's: sandboxd itself, msgspec, the seccomp bindings and whatever they
pulled in.
"""

from __future__ import annotations

import atexit
import builtins
import importlib
import io
import linecache
import os
import sys
import threading
import traceback
import types
from typing import NoReturn

from sandboxd import control
from sandboxd.control import JobHeader
from sandboxd.jail import JailSpec, rlimits
from sandboxd.runtimes import datascience

# The whole environment a run sees; nothing of the host's is passed in.
ENVIRONMENT = {
    "PATH": "/usr/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "USER": "sandbox",
    "PYTHONIOENCODING": "utf-8",
}

# Every run adds this warnings filter right before its code (start()); added once here,
# at the zygote's import, its regex is compiled once instead of in every worker.
datascience.before_code()


def root_files(spec: JailSpec) -> dict[str, bytes]:
    return {}


def prepare(spec: JailSpec) -> None:
    sys.path[:] = spec.python_path
    sys.path_importer_cache.clear()
    sys.argv[:] = ["-c"]
    os.environ.clear()
    os.environ.update({**ENVIRONMENT, **datascience.ENVIRONMENT, **spec.proxy_env})


def _jail_module(module: object, jail_dirs: tuple[str, ...], jail_files: set[str]) -> bool:
    """Whether a module was loaded from the jail's own dependency environment."""
    location = getattr(module, "__file__", None) or ""
    return (bool(jail_dirs) and location.startswith(jail_dirs)) or location in jail_files


def forget_bootstrap(spec: JailSpec) -> None:
    """Drop from sys.modules every module that is neither the standard library's nor
    the jail environment's (warmed by the zygote), so an import finds the jail's.

    Of Debian's dist-packages only the bound packages count (spec.python_packaged):
    the zygote's own seccomp bindings live in that directory too.
    """
    packaged_dirs = {os.path.dirname(path) for path in spec.python_packaged}
    dirs = [p for p in (*spec.python_path, spec.python_site_packages) if p]
    jail_dirs = tuple(
        os.path.join(path, "")
        for path in [*(d for d in dirs if d not in packaged_dirs), *spec.python_packaged]
    )
    jail_files = set(spec.python_packaged)  # single-file modules such as six.py
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] in sys.stdlib_module_names or _jail_module(
            module, jail_dirs, jail_files
        ):
            continue
        del sys.modules[name]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()


def _register_source(filename: str, source: str) -> None:
    """Let tracebacks show the lines of code that was never a file."""
    lines = source.splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)


def _exit_code(exc: SystemExit) -> int:
    """What CPython would exit with for this SystemExit."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _set_stdio() -> None:
    sys.stdin = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)),
        encoding="utf-8",
        errors="surrogateescape",
    )
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
    )
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    # The originals point at the zygote's streams; code that falls back on them must not.
    for name in ("stdin", "stdout", "stderr"):
        setattr(sys, f"__{name}__", getattr(sys, name))


def _run(job: JobHeader) -> int:
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    try:
        for filename, source in (("<preload>", job.preload), ("<code>", job.code)):
            if source:
                _register_source(filename, source)
                exec(compile(source, filename, "exec"), main.__dict__)
    except SystemExit as exc:
        return _exit_code(exc)
    except BaseException as exc:
        traceback.print_exception(
            type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None
        )
        return 1
    return 0


def _shutdown(code: int) -> NoReturn:
    """What interpreter exit does: join threads, run atexit, flush; then leave at once."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:
        traceback.print_exception(exc)
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = code or 120
    os._exit(code)


def start(spec: JailSpec, ready_fd: int) -> NoReturn:
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    try:
        job = control.read_job(0)
    except EOFError:
        os._exit(0)  # retired without a job
    rlimits.lower_for_job(job.memory_mb, job.timeout)
    forget_bootstrap(spec)
    _set_stdio()
    datascience.write_inputs(job.files)
    if job.boundary:
        atexit.register(datascience.after_code, job.boundary)
        datascience.before_code()
    _shutdown(_run(job))
