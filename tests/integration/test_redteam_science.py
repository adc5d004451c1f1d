"""Red team: the data-science jail root and its template (DESIGN.md invariants 5, 9, 15, 16).

That runtime's root is the python3 root plus Debian's numpy, pandas and matplotlib,
their python3-* dependencies, their shared libraries and data paths (debianpy.py),
and every run is a fresh fork of one warm template. The attacker writes both runs
of each pair (tenants.run_together): one that tries to read what the root must not
hold (the rest of the host's dist-packages, the daemon's own packages, host /etc),
to write into the bound paths, or to leave data where another run (concurrent or
later) finds it: any writable directory, matplotlib's config and cache dirs, the
template's warm module state. Each run prints MARKER only when the attack worked.
The host checks that the template has no shared writable mapping its forks share.

The daemon here serves Debian's packages alone (no synced environment: what the
.deb gives offline), so what the science root holds is what debianpy bound.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd import debianpy
from sandboxd.jail import rootfs
from tests.integration.conftest import Daemon, start_daemon, stop_daemon
from tests.integration.tenants import MARKER, Tenant, run_together


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon whose data-science pool has Debian's numpy, pandas, matplotlib only."""
    if not os.path.exists(os.path.join(debianpy.DIST_PACKAGES, "numpy", "__init__.py")):
        pytest.fail("these attacks need Debian's python3-numpy, -pandas, -matplotlib installed")
    running = start_daemon(tmp_path_factory.mktemp("redteam-science"))
    yield running
    stop_daemon(running)
    assert running.process.returncode == 0, running.log_path.read_text()


def _bound_dist_packages() -> set[str]:
    """Names directly under dist-packages that a science root may hold: what debianpy
    binds for the python3 and science profiles (computed here, on the host)."""
    prefix = debianpy.DIST_PACKAGES + "/"
    names = set()
    for profile in ("python3", "science"):
        for entry in debianpy.root_entries(profile):
            if entry.path.startswith(prefix):
                names.add(entry.path[len(prefix) :].split("/", 1)[0])
    return names


# Ends each run of a pair, so that the two are alive at the same time.
_OVERLAP = "import time\ntime.sleep(0.6)\n"

# Imported at the top so the run goes to the data-science pool (profiles.py).
_SCIENCE = "import numpy, pandas, matplotlib, matplotlib.pyplot\n"


def test_the_science_root_holds_only_the_bound_dist_packages(debian: Daemon) -> None:
    allowed = sorted(_bound_dist_packages())
    code = (
        _SCIENCE
        + (
            "import os, importlib.util\n"
            f"allowed = set({allowed!r})\n"
            f"dist = {debianpy.DIST_PACKAGES!r}\n"
            "names = set(os.listdir(dist))\n"
            "extra = names - allowed\n"
            "if extra:\n"
            "    print('MARKER unbound dist-packages entries', sorted(extra))\n"
            # h11 is Debian's, bound as python3-httpx's dependency (debianpy PROFILES).
            "for name in ('sandboxd', 'msgspec', 'trio', 'pystemd', 'seccomp', 'pyseccomp'):\n"
            "    if importlib.util.find_spec(name) is not None:\n"
            "        print('MARKER importable', name)\n"
            "for top, dirs, files in os.walk('/'):\n"
            "    if top in ('/proc', '/sys', '/dev'):\n"
            "        dirs[:] = []\n"
            "        continue\n"
            "    for name in dirs + files:\n"
            "        if name in ('sandboxd', 'msgspec', 'pystemd', 'sandboxd.toml', 'trio'):\n"
            "            print('MARKER daemon file', os.path.join(top, name))\n"
            "print('BOUND', len(names))\n"
        )
        + _OVERLAP
    )
    plain = (
        "import os\n"
        f"dist = {debianpy.DIST_PACKAGES!r}\n"
        "science = {'numpy', 'pandas', 'matplotlib', 'PIL'} & set(os.listdir(dist))\n"
        "if science:\n"
        "    print('MARKER plain root holds', sorted(science))\n"
    ) + _OVERLAP
    science, plain_answer = run_together(debian, Tenant("python3", code), Tenant("python3", plain))
    assert science.status == "ok" and "BOUND" in science.stdout, science.raw
    assert plain_answer.status == "ok", plain_answer.raw


def test_no_host_etc_beyond_the_bound_files(debian: Daemon) -> None:
    # What /etc may hold: the root's own small files, the TLS trust store, and what the
    # science profile binds there (/etc/matplotlibrc and link targets under /etc).
    allowed = {path.split("/")[2] for path in rootfs.ETC_FILES}
    allowed |= {e.path.split("/")[2] for e in rootfs.TLS_TRUST if e.path.startswith("/etc/")}
    for profile in ("python3", "science"):
        for entry in debianpy.root_entries(profile):
            if entry.path.startswith("/etc/"):
                allowed.add(entry.path.split("/")[2])
    code = (
        _SCIENCE
        + (
            "import os\n"
            f"allowed = set({sorted(allowed)!r})\n"
            "extra = set(os.listdir('/etc')) - allowed\n"
            "if extra:\n"
            "    print('MARKER host /etc entries', sorted(extra))\n"
            "for path in ('/etc/shadow', '/etc/sandboxd/sandboxd.toml', '/etc/machine-id',\n"
            "             '/etc/ssl/private', '/root', '/home', '/run', '/var'):\n"
            "    if os.path.lexists(path):\n"
            "        print('MARKER host path', path)\n"
            "print('ETC', sorted(os.listdir('/etc')))\n"
        )
        + _OVERLAP
    )
    first, second = run_together(debian, Tenant("python3", code), Tenant("python3", code))
    assert "ETC" in first.stdout and "ETC" in second.stdout, (first.raw, second.raw)


def _bound_targets() -> list[str]:
    """A few bound paths of the science profile: each data path, a module dir, a .so."""
    paths = [path for path in debianpy.DATA["science"] if os.path.exists(path)]
    paths += [os.path.join(debianpy.DIST_PACKAGES, name) for name in ("numpy", "matplotlib")]
    core = Path(debianpy.DIST_PACKAGES, "numpy", "core")
    paths += sorted(str(p) for p in core.glob("_multiarray_umath*.so"))[:1]
    return paths


def test_bound_paths_cannot_be_written(debian: Daemon) -> None:
    targets = _bound_targets()
    before = {path: os.stat(path).st_mtime_ns for path in targets}
    code = (
        _SCIENCE
        + (
            "import os\n"
            f"targets = {targets!r}\n"
            "for path in targets:\n"
            "    attempts = []\n"
            "    if os.path.isdir(path):\n"
            "        attempts.append(lambda: open(os.path.join(path, 'planted.py'), 'x').close())\n"
            "        attempts.append(lambda: os.mkdir(os.path.join(path, 'planted')))\n"
            "    else:\n"
            "        attempts.append(lambda: open(path, 'ab').close())\n"
            "        attempts.append(lambda: os.truncate(path, 0))\n"
            "    attempts.append(lambda: os.utime(path, (0, 0)))\n"
            "    attempts.append(lambda: os.chmod(path, 0o777))\n"
            "    attempts.append(lambda: os.rename(path, path + '.moved'))\n"
            "    for attempt in attempts:\n"
            "        try:\n"
            "            attempt()\n"
            "        except OSError:\n"
            "            continue\n"
            "        print('MARKER wrote', path)\n"
            "print('TRIED', len(targets))\n"
        )
        + _OVERLAP
    )
    for answer in run_together(debian, Tenant("python3", code), Tenant("python3", code)):
        assert f"TRIED {len(targets)}" in answer.stdout, answer.raw
    assert {path: os.stat(path).st_mtime_ns for path in targets} == before


# Each run leaves a token in every directory it can write (walked from /), in
# and in matplotlib's config and cache dirs;
# then, after the other has done the same, it looks for the other's token in all of
# them. run_together gives the two runs their own code, so each knows which is whose.
_PLANT_AND_LOOK = _SCIENCE + (
    "import os, time, matplotlib\n"
    "MINE, THEIRS = 'TOKEN-{mine}-c41b', 'TOKEN-{theirs}-c41b'\n"
    "def writable_dirs():\n"
    "    for top, dirs, _ in os.walk('/'):\n"
    "        if top in ('/proc', '/sys'):\n"
    "            dirs[:] = []\n"
    "            continue\n"
    "        if os.access(top, os.W_OK):\n"
    "            yield top\n"
    "extra = [matplotlib.get_configdir(), matplotlib.get_cachedir(),\n"
    "         os.environ.get('MPLCONFIGDIR', ''), os.path.expanduser('~')]\n"
    "planted = 0\n"
    "for place in sorted(set(writable_dirs()) | {{d for d in extra if d}}):\n"
    "    try:\n"
    "        os.makedirs(place, exist_ok=True)\n"
    "        for name in (MINE, 'fontlist-v330.json', 'matplotlibrc'):\n"
    "            with open(os.path.join(place, name), 'w') as f:\n"
    "                f.write(MINE)\n"
    "        planted += 1\n"
    "    except OSError:\n"
    "        pass\n"
    "time.sleep(1.5)\n"
    "for place in sorted(set(writable_dirs()) | {{d for d in extra if d}}):\n"
    "    try:\n"
    "        names = os.listdir(place)\n"
    "    except OSError:\n"
    "        continue\n"
    "    for name in names:\n"
    "        path = os.path.join(place, name)\n"
    "        try:\n"
    "            data = open(path).read()\n"
    "        except (OSError, UnicodeDecodeError):\n"
    "            data = ''\n"
    "        if THEIRS in name or THEIRS in data:\n"
    "            print('MARKER found the other run in', path)\n"
    "print('PLANTED', planted)\n"
)


def test_no_writable_place_passes_data_between_two_concurrent_science_runs(
    debian: Daemon,
) -> None:
    first, second = run_together(
        debian,
        Tenant("python3", _PLANT_AND_LOOK.format(mine="A", theirs="B"), timeout=30),
        Tenant("python3", _PLANT_AND_LOOK.format(mine="B", theirs="A"), timeout=30),
    )
    for answer in (first, second):
        assert answer.status == "ok", answer.raw
        # Each run could write somewhere (its /tmp at least): the look-up was real.
        assert "PLANTED 0" not in answer.stdout and "PLANTED" in answer.stdout, answer.raw
    # A later run, plain or data-science, finds neither token either.
    later = _SCIENCE + (
        "import os\n"
        "for top, dirs, files in os.walk('/'):\n"
        "    if top in ('/proc', '/sys'):\n"
        "        dirs[:] = []\n"
        "        continue\n"
        "    for name in files:\n"
        "        if 'TOKEN-' in name:\n"
        "            print('MARKER left by an earlier run', os.path.join(top, name))\n"
        "print('LOOKED')\n"
    )
    for code in (later, later[len(_SCIENCE) :]):
        result = debian.run(code, timeout=30)
        assert result["status"] == "ok" and result["stdout"] == "LOOKED\n", result


# The open fds (there is no /proc in a jail: each number is probed).
_FDS = (
    "import os\n"
    "def _is_open(fd):\n"
    "    try:\n"
    "        os.fstat(fd)\n"
    "    except OSError:\n"
    "        return False\n"
    "    return True\n"
    "print('FDS', [fd for fd in range(4096) if _is_open(fd)])\n"
)

# A run changes every piece of warm module state it can reach; the next run prints it.
_CHANGE_STATE = _SCIENCE + (
    "import sys, numpy, pandas, matplotlib\n"
    "matplotlib.rcParams['lines.linewidth'] = 7.25\n"
    "matplotlib.rcParams['savefig.directory'] = '/tmp/TOKEN'\n"
    "pandas.set_option('display.max_rows', 3)\n"
    "numpy.set_printoptions(precision=1)\n"
    "numpy.seterr(all='raise')\n"
    "numpy.TOKEN = 'planted'\n"
    "numpy.random.seed(1234)\n"
    "sys.modules['TOKEN_module'] = numpy\n"
    "import matplotlib.font_manager as fm\n"
    "fm.fontManager.ttflist.clear()\n"
    "import threading, time\n"
    "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
    "open('/tmp/TOKEN-fd', 'w')\n"
    "print('CHANGED')\n"
)
_READ_STATE = _SCIENCE + (
    "import os, sys, threading, numpy, pandas, matplotlib\n"
    "import matplotlib.font_manager as fm\n"
    "checks = {\n"
    "    'rc linewidth': matplotlib.rcParams['lines.linewidth'] == 7.25,\n"
    "    'rc savefig': 'TOKEN' in str(matplotlib.rcParams['savefig.directory']),\n"
    "    'pandas option': pandas.get_option('display.max_rows') == 3,\n"
    "    'printoptions': numpy.get_printoptions()['precision'] == 1,\n"
    "    'seterr': numpy.geterr()['divide'] == 'raise',\n"
    "    'module attribute': hasattr(numpy, 'TOKEN'),\n"
    "    'sys.modules': 'TOKEN_module' in sys.modules,\n"
    "    'font list': not fm.fontManager.ttflist,\n"
    "    'seeded': numpy.random.RandomState(1234).random() == numpy.random.random(),\n"
    "    'thread': threading.active_count() != 1,\n"
    "    'tmp file': os.path.exists('/tmp/TOKEN-fd'),\n"
    "}\n"
    "for name, leaked in checks.items():\n"
    "    if leaked:\n"
    "        print('MARKER template state leaked:', name)\n" + _FDS
)


def test_warm_module_state_a_run_changes_does_not_reach_other_runs(debian: Daemon) -> None:
    # Concurrent: the second run reads while the first changed everything (and still lives).
    first, second = run_together(
        debian,
        Tenant("python3", _CHANGE_STATE + "import time\ntime.sleep(1.5)\n"),
        Tenant("python3", "import time\ntime.sleep(0.7)\n" + _READ_STATE),
    )
    assert "CHANGED" in first.stdout, first.raw
    # Later: a run after the changing one has exited.
    later = debian.run(_READ_STATE.replace("MARKER", MARKER))
    for answer in (second.raw, later):
        assert answer["status"] == "ok", answer["stderr"]
        assert MARKER not in answer["stdout"], answer
    # No fd of the template's: stdio only, as in a plain worker (invariant 12).
    plain = debian.run(_FDS)
    assert plain["status"] == "ok", plain
    science_line = [ln for ln in later["stdout"].splitlines() if ln.startswith("FDS")]
    assert science_line == plain["stdout"].splitlines() == ["FDS [0, 1, 2]"], (later, plain)


def _children(pid: int) -> list[int]:
    """The host pids whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_the_template_has_no_shared_writable_mapping_its_runs_inherit(debian: Daemon) -> None:
    # A MAP_SHARED writable mapping in the template would be one memory all its runs
    # write and read at once (a fork keeps it shared). A jail has no /proc to find one,
    # so the host looks at the template itself.
    assert debian.run(_SCIENCE + "print(1)")["status"] == "ok"
    templates = [
        pid
        for pid in _children(debian.process.pid)
        if Path("/proc", str(pid), "comm").read_text().strip() == "sandboxd-tmpl"
        and os.stat(Path("/proc", str(pid))).st_uid == 0  # its ready workers have their uids
    ]
    assert len(templates) == 1, templates
    maps = Path("/proc", str(templates[0]), "maps").read_text().splitlines()
    shared = [line for line in maps if line.split()[1][1] == "w" and line.split()[1][3] == "s"]
    assert shared == []
    assert len(maps) > 100  # numpy, pandas and matplotlib are mapped: the right process


# Science and plain workers are cloned by different parents (the template, the
# zygote): each listens where the other might connect, then tries the other's.
_LISTEN_AND_CONNECT = """
import os, socket, time
MINE, THEIRS = %d, %d
print('UID', os.getuid())
def places(n):
    return ((socket.AF_UNIX, '\\0sbx-rt2-%%d' %% n), (socket.AF_INET, ('127.0.0.1', 47000 + n)))
servers = []
for family, address in places(MINE):
    server = socket.socket(family, socket.SOCK_STREAM)
    try:
        server.bind(address)
        server.listen()
        servers.append(server)
    except OSError as exc:
        print('BIND', exc)
time.sleep(0.8)
for family, address in places(THEIRS):
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(0.5)
    try:
        client.connect(address)
        print('MARKER connected to the other run', address)
    except OSError:
        pass
time.sleep(0.8)
print('LISTENED', len(servers))
"""


def test_a_science_run_and_a_plain_run_cannot_connect(debian: Daemon) -> None:
    pair = run_together(
        debian,
        Tenant("python3", _SCIENCE + _LISTEN_AND_CONNECT % (1, 2)),
        Tenant("python3", _LISTEN_AND_CONNECT % (2, 1)),
    )
    for answer in pair:
        assert "LISTENED 2" in answer.stdout, answer.raw
    # Two live workers, of two pools: two uids, neither root (invariant 4).
    uids = [line for answer in pair for line in answer.stdout.splitlines() if "UID" in line]
    assert len(set(uids)) == 2 and "UID 0" not in uids, uids
