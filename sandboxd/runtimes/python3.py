"""The python3 runtime: its record (RUNTIME: the jail root, warm modules, dependency
environment), and its runner: a forked zygote child runs one job as `__main__` and exits.

User code shares this interpreter and can rewrite anything in it, so nothing
here reports an outcome: the exit status is read by the daemon with wait4.

User code sees only its own modules (DESIGN.md invariant 16): the zygote ran without
site (zygote.command), prepare() sets sys.path to the jail's (the stdlib and the
dependency environment), and before the worker says it is ready, forget_bootstrap()
removes from sys.modules every module that is neither the standard library's nor the jail
environment's: sandboxd itself, msgspec, the seccomp bindings and whatever they
pulled in. Which ones is decided once before the forks (before_forks, plan_forgetting),
so a worker only deletes.
"""

from __future__ import annotations

import atexit
import builtins
import importlib
import io
import itertools
import linecache
import os
import sys
import threading
import traceback
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from sandboxd import control
from sandboxd.control import JobHeader
from sandboxd.jail import JailSpec, RuntimeJail, rlimits
from sandboxd.runtimes import DepsLayout, Runtime, datascience

if TYPE_CHECKING:
    from sandboxd.config import Config, DepsConfig

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


# Modules the zygote imports once so that every worker starts with them warm.
WARM_MODULES = (
    "json",
    "base64",
    "re",
    "datetime",
    "collections",
    "itertools",
    "functools",
    "math",
    "random",
    "string",
    "time",
    "typing",
    "decimal",
    "hashlib",
    "uuid",
    "traceback",
    "linecache",
    "threading",
    "textwrap",
    "dataclasses",
    "enum",
    "statistics",
    "copy",
    "urllib.parse",
    "zoneinfo",
    "logging",
    "io",
    "struct",
    "operator",
    "heapq",
    "bisect",
    "fractions",
    "csv",
    "pprint",
    "html",
    "secrets",
    "unicodedata",
    "encodings.idna",
)

# Where the dependency environment's packages appear inside the python jail.
JAIL_SITE_PACKAGES = "/opt/sandboxd/python"


def jail(config: Config, built: Mapping[str, RuntimeJail]) -> RuntimeJail:
    """The python3 root: the host's interpreter and stdlib, the live dependency
    environment, and Debian's packaged modules behind it (debianpy)."""
    import sysconfig

    from sandboxd import debianpy, deps
    from sandboxd.jail import rootfs

    stdlib = sysconfig.get_paths()["stdlib"]
    path = [stdlib, os.path.join(stdlib, "lib-dynload")]
    extra: dict[str, str] = {}
    site = deps.live_python_site_packages(config.server.state_dir)
    if site is not None:
        extra[site] = JAIL_SITE_PACKAGES
        path.append(JAIL_SITE_PACKAGES)
    entries = rootfs.python_entries(extra)
    # Debian's jinja2, requests, httpx: importable offline, behind the synced environment.
    packaged = [e for e in debianpy.root_entries("python3") if e not in entries]
    if packaged:
        entries += packaged
        path.append(debianpy.DIST_PACKAGES)
    return RuntimeJail(
        runner="python3",
        seccomp_policy="python3",
        entries=entries,
        environment=site,
        path=path,
        packaged=[e.path for e in packaged if e.path.startswith(debianpy.DIST_PACKAGES + "/")],
        warm_modules=list(WARM_MODULES),
    )


def environment() -> DepsLayout:
    """Its dependency environment: a venv of the host's python3, filled by pip (deps.py,
    imported only here, in the daemon: never in the zygote)."""
    from sandboxd import deps

    def sync(
        config: DepsConfig, state_dir: str, offline: bool, wheelhouse: str | None, force: bool
    ) -> str:
        return deps.sync_python(
            state_dir, config.python_requirements, config.index_url, offline, wheelhouse, force
        )

    return DepsLayout(
        "python",
        lambda config: config.python_requirements,
        sync,
        deps.live_python_site_packages,
        deps.installed_python,
    )


RUNTIME = Runtime(
    name="python3",
    language="python3",
    runner="python3",
    seccomp_policy="python3",
    section="python3",
    jail=jail,
    deps=environment,
)


def root_files(spec: JailSpec, runtime: RuntimeJail) -> dict[str, bytes]:
    return {}


def before_forks(spec: JailSpec, runtime: RuntimeJail) -> None:
    plan_forgetting(runtime)


def prepare(spec: JailSpec, runtime: RuntimeJail) -> None:
    sys.path[:] = runtime.path
    sys.path_importer_cache.clear()
    sys.argv[:] = ["-c"]
    os.environ.clear()
    os.environ.update({**ENVIRONMENT, **datascience.ENVIRONMENT, **spec.proxy_env})


def _jail_module(module: object, jail_dirs: tuple[str, ...], jail_files: set[str]) -> bool:
    """Whether a module was loaded from the jail's own dependency environment."""
    location = getattr(module, "__file__", None) or ""
    return (bool(jail_dirs) and location.startswith(jail_dirs)) or location in jail_files


def _plan_key(runtime: RuntimeJail) -> tuple[tuple[str, ...], str | None, tuple[str, ...]]:
    """What decides which modules a runtime's workers drop."""
    return tuple(runtime.path), runtime.environment, tuple(runtime.packaged)


def _foreign(names: Iterable[str], runtime: RuntimeJail) -> list[str]:
    """Of the modules `names`, those that are neither the standard library's nor the
    jail environment's.

    Of Debian's dist-packages only the bound packages count (RuntimeJail.packaged):
    the zygote's own seccomp bindings live in that directory too.
    """
    packaged_dirs = {os.path.dirname(path) for path in runtime.packaged}
    dirs = [p for p in (*runtime.path, runtime.environment) if p]
    jail_dirs = tuple(
        os.path.join(path, "")
        for path in [*(d for d in dirs if d not in packaged_dirs), *runtime.packaged]
    )
    jail_files = set(runtime.packaged)  # single-file modules such as six.py
    return [
        name
        for name in names
        if name.partition(".")[0] not in sys.stdlib_module_names
        and not _jail_module(sys.modules[name], jail_dirs, jail_files)
    ]


@dataclass(frozen=True)
class _Plan:
    """The modules to drop, decided before the fork: how many sys.modules held then
    and the last of them, the names to drop and their modules, held so that dropping
    them in a worker frees nothing (freeing what they alone referenced wrote to ~130
    of the zygote's pages)."""

    count: int
    last: str
    drop: tuple[str, ...]
    held: tuple[object, ...]


# Per _plan_key: decided in the zygote (and again in a template after its warm
# imports), so a worker only deletes. Judging every module in the worker and freeing
# the dropped ones cost ~350 copy-on-write faults (about 1 ms); with the plan ~130.
_plans: dict[tuple[tuple[str, ...], str | None, tuple[str, ...]], _Plan] = {}


def plan_forgetting(runtime: RuntimeJail) -> None:
    """Decide now which of the modules loaded so far forget_bootstrap() drops."""
    drop = tuple(_foreign(sys.modules, runtime))
    _plans[_plan_key(runtime)] = _Plan(
        len(sys.modules), next(reversed(sys.modules)), drop, tuple(sys.modules[n] for n in drop)
    )


def _added_since(plan: _Plan | None) -> list[str] | None:
    """The modules loaded since the plan, or None when sys.modules lost one of the
    plan's since: dicts keep insertion order, so the names after the plan's last are
    exactly those added since, and a removal before it moves it."""
    if plan is None or len(sys.modules) < plan.count:
        return None
    newest = list(itertools.islice(reversed(sys.modules), len(sys.modules) - plan.count + 1))
    return newest[:-1] if newest[-1] == plan.last else None


def forget_bootstrap(runtime: RuntimeJail) -> None:
    """Drop from sys.modules every module that is neither the standard library's nor
    the jail environment's (warmed by the zygote), so an import finds the jail's.

    The modules loaded when plan_forgetting() ran are judged by its plan (until the
    job only our code runs, which changes no module's file), those added since by
    themselves; if one of the plan's was removed since, every module is judged.
    """
    plan = _plans.get(_plan_key(runtime))
    added = _added_since(plan)
    if plan is None or added is None:
        drop = _foreign(list(sys.modules), runtime)
    else:
        drop = [*plan.drop, *_foreign(added, runtime)]
    for name in drop:
        sys.modules.pop(name, None)
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


def start(spec: JailSpec, runtime: RuntimeJail, ready_fd: int) -> NoReturn:
    # Done before "ready", off the request path (about 0.8 ms of a run's wall time):
    # the job is read with os.read and decoded by the already bound decoder, which
    # imports nothing, so nothing of the bootstrap is back in sys.modules by the code.
    forget_bootstrap(runtime)
    _set_stdio()
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    try:
        job = control.read_job(0)
    except EOFError:
        os._exit(0)  # retired without a job
    rlimits.lower_for_job(job.memory_mb, job.timeout)
    datascience.write_inputs(job.files)
    if job.boundary:
        atexit.register(datascience.after_code, job.boundary)
        datascience.before_code()
    _shutdown(_run(job))
