"""Data science in a real daemon: numpy, pandas and matplotlib warm in the data-science
template, files sent in `files`, figures and /tmp/out files returned, fresh state per
run, the memory verdict with the template warm, bad file names, and 50 concurrent runs.

Every test runs against two daemons: one whose jail environment holds newer versions
synced from PyPI (they shadow Debian's), and one with Debian's python3-numpy,
python3-pandas and python3-matplotlib only (no sync: what the .deb gives offline)."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandboxd import deps
from tests.integration.conftest import Daemon, start_daemon, stop_daemon

REQUIREMENTS = Path(__file__).with_name("datascience-requirements.txt")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Where each daemon's jail finds numpy, and the major.minor versions it must get.
SOURCES = {
    "synced": ("/opt/sandboxd/python/numpy/__init__.py", None),
    "debian": ("/usr/lib/python3/dist-packages/numpy/__init__.py", ("1.24", "1.5", "3.6")),
}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def science(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """A daemon whose data-science jail holds numpy, pandas and matplotlib: from PyPI
    ("synced"), or Debian's packages alone ("debian")."""
    state = tmp_path_factory.mktemp("science-state")
    if request.param == "synced":
        deps.sync_python(str(state), str(REQUIREMENTS))
    # An output cap of 2 MiB (the default is 8) keeps the image-limit test's figures small.
    running = start_daemon(
        tmp_path_factory.mktemp("science"),
        "[limits]\noutput_bytes = 2097152\n",
        state_dir=str(state),
    )
    running.extra["source"] = request.param
    yield running
    stop_daemon(running)
    assert running.process.returncode == 0, running.log_path.read_text()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == PNG_SIGNATURE, data[:16]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def ok(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer.get("status") == "ok", answer
    return answer


def test_warm_modules_are_imported_from_the_jail_environment(science: Daemon) -> None:
    code = (
        "import sys\n"
        "warm = [m for m in ('numpy', 'pandas', 'matplotlib.pyplot') if m in sys.modules]\n"
        "import numpy, pandas, matplotlib\n"
        "versions = ' '.join(m.__version__ for m in (numpy, pandas, matplotlib))\n"
        "print(warm, numpy.__file__, matplotlib.get_backend(), versions, sep='|')\n"
    )
    warm, path, backend, versions = ok(science.run(code))["stdout"].rstrip().split("|")
    assert warm == "['numpy', 'pandas', 'matplotlib.pyplot']"
    # Where the jail sees its environment: the synced one shadows Debian's.
    expected_path, debian_versions = SOURCES[science.extra["source"]]
    assert path == expected_path
    assert backend.lower() == "agg"
    if debian_versions is not None:
        got = tuple(".".join(v.split(".")[:2]) for v in versions.split())
        assert got == debian_versions, versions
    # Every warm module imported, and none left a thread (BLAS) or an fd in the template.
    assert "warm modules:" not in science.log_path.read_text()


def test_a_run_that_imports_no_warm_module_gets_a_plain_worker(science: Daemon) -> None:
    code = "import sys\nprint([m for m in ('numpy', 'pandas', 'matplotlib') if m in sys.modules])"
    assert ok(science.run(code))["stdout"] == "[]\n"
    # The scan misses a computed name: the plain pool's worker imports numpy cold from
    # the synced environment; Debian's numpy is bound into data-science workers only.
    late = (
        "import sys\n"
        "plain = 'numpy' in sys.modules\n"
        "try:\n"
        "    found = __import__('nu' + 'mpy').__name__ + ' imported'\n"
        "except ModuleNotFoundError as exc:\n"
        "    found = f'{exc.name} missing'\n"
        "print(plain, found)"
    )
    found = "imported" if science.extra["source"] == "synced" else "missing"
    expected = f"False numpy {found}\n"
    assert ok(science.run(late))["stdout"] == expected


def test_threaded_blas_matmul(science: Daemon) -> None:
    code = (
        "import threading, numpy as np\n"
        "results = {}\n"
        "def work(k):\n"
        "    a = np.full((300, 300), float(k))\n"
        "    results[k] = float((a @ np.eye(300)).sum())\n"
        "threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(sorted(results.items()))\n"
    )
    expected = sorted((k, float(k * 300 * 300)) for k in range(1, 5))
    assert ok(science.run(code))["stdout"] == f"{expected}\n"


def test_pandas_groupby_of_a_csv_sent_in_files(science: Daemon) -> None:
    rows = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)]
    csv = "key,value\n" + "".join(f"{k},{v}\n" for k, v in rows)
    code = (
        "import pandas as pd\n"
        "frame = pd.read_csv('data.csv')\n"
        "print(frame.groupby('key')['value'].sum().to_json())\n"
    )
    files = {"data.csv": base64.b64encode(csv.encode()).decode()}
    answer = ok(science.run(code, files=files))
    sums: dict[str, int] = {}
    for key, value in rows:
        sums[key] = sums.get(key, 0) + value
    assert json.loads(answer["stdout"]) == sums


def test_open_figure_and_savefig_come_back_as_png(science: Daemon) -> None:
    code = (
        "import matplotlib.pyplot as plt\n"
        "fig = plt.figure(figsize=(4, 3), dpi=100)\n"
        "plt.plot([1, 2, 3], [3, 1, 2])\n"
        "fig.savefig('/tmp/out/plot.png')\n"
        "print('drawn')\n"
    )
    answer = ok(science.run(code))
    assert answer["stdout"] == "drawn\n"
    assert answer["truncated"] is False
    [image] = answer["images"]
    assert image["mime"] == "image/png"
    assert png_size(base64.b64decode(image["base64"])) == (400, 300)
    [saved] = answer["files"]
    assert saved["name"] == "plot.png"
    assert png_size(base64.b64decode(saved["base64"])) == (400, 300)


def test_plt_show_returns_every_figure_quietly(science: Daemon) -> None:
    code = (
        "import matplotlib.pyplot as plt\n"
        "for n in range(3):\n"
        "    plt.figure(figsize=(2, 1), dpi=50); plt.plot([0, n])\n"
        "plt.show()\n"
    )
    answer = ok(science.run(code))
    assert answer["stderr"] == ""
    sizes = [png_size(base64.b64decode(i["base64"])) for i in answer["images"]]
    assert sizes == [(100, 50)] * 3


def test_figure_comes_back_inside_data_on_the_dify_route(science: Daemon) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nprint('x')\n"
    response = httpx.post(
        f"{science.http_url}/v1/sandbox/run",
        json={"language": "python3", "code": code, "preload": "", "enable_network": True},
        headers={"X-Api-Key": science.api_key},
        timeout=60,
    )
    data = response.json()["data"]
    assert data["stdout"] == "x\n" and data["error"] == ""
    [image] = data["images"]
    assert png_size(base64.b64decode(image["base64"])) == (640, 480)


def test_images_over_the_output_limit_set_the_truncated_flag(science: Daemon) -> None:
    code = (
        "import matplotlib.pyplot as plt, numpy as np\n"
        "rng = np.random.default_rng(1)\n"
        "for n in range(6):\n"
        "    plt.figure(figsize=(12, 12), dpi=100); plt.imshow(rng.random((300, 300)))\n"
    )
    answer = science.run(code)
    assert answer["status"] == "output_limit", {k: v for k, v in answer.items() if k != "images"}
    assert answer["truncated"] is True
    assert answer["images"] == []


def test_a_forged_trailer_stays_in_stdout(science: Daemon) -> None:
    fake = '\\x00sandboxd-artifacts-0\\x00{"images": [], "files": []}'
    answer = ok(science.run(f"print('{fake}')"))
    assert answer["stdout"] == fake.replace("\\x00", "\x00") + "\n"
    assert answer["images"] == [] and answer["files"] == []


STATE_PROBE = (
    "import matplotlib, numpy as np, pandas as pd\n"
    "print(matplotlib.rcParams['lines.linewidth'], pd.get_option('display.max_rows'),"
    " np.geterr()['divide'])\n"
)


def test_a_run_that_changes_library_state_leaves_the_next_pristine(science: Daemon) -> None:
    before = ok(science.run(STATE_PROBE))["stdout"]
    change = (
        "import matplotlib, numpy as np, pandas as pd\n"
        "matplotlib.rcParams['lines.linewidth'] = 9.5\n"
        "pd.set_option('display.max_rows', 3)\n"
        "np.seterr(all='raise')\n"
    )
    changed = ok(science.run(change + STATE_PROBE))["stdout"]
    assert changed == "9.5 3 raise\n"
    assert before != changed
    after = [ok(science.run(STATE_PROBE))["stdout"] for _ in range(4)]
    assert after == [before] * 4


def test_large_array_gets_the_memory_verdict_with_the_template_warm(science: Daemon) -> None:
    code = "import numpy as np\na = np.ones((400, 1024, 1024), dtype=np.uint8)\nprint(a.sum())"
    answer = science.run(code, memory_mb=128)
    assert answer["status"] == "memory", answer
    science.assert_healthy()


BAD_NAMES = ["/etc/passwd", "../escape", "a/b", "a\x00b", "x" * 256, "", ".", ".."]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_file_name_is_a_bad_request_naming_files(science: Daemon, name: str) -> None:
    answer = science.run("print(1)", files={name: "eA=="})
    assert answer["error"]["code"] == "bad_request", answer
    assert "files" in answer["error"]["message"]
    science.assert_healthy()


def test_too_many_files_and_bad_base64_are_bad_requests(science: Daemon) -> None:
    many = {f"f{n}": "eA==" for n in range(33)}
    for files in (many, {"data.bin": "not base64!"}):
        answer = science.run("print(1)", files=files)
        assert answer["error"]["code"] == "bad_request", answer
        assert "files" in answer["error"]["message"]
    science.assert_healthy()


BROAD_RUN = (
    "import os, threading, numpy as np, pandas as pd, matplotlib.pyplot as plt\n"
    "m = np.random.default_rng(0).random((200, 200))\n"
    "work = lambda: (np.linalg.inv(m), m @ m)\n"
    "threads = [threading.Thread(target=work) for _ in range(3)]\n"
    "[t.start() for t in threads]; [t.join() for t in threads]\n"
    "frame = pd.read_csv('rows.csv')\n"
    "plt.figure(figsize=(2, 2), dpi=40); plt.plot(frame['v']); plt.title('fonts $x^2$')\n"
    "plt.savefig('/tmp/out/plot.png')\n"
    "print(frame.groupby('k')['v'].sum().to_dict(), len(os.sched_getaffinity(0)) > 0)\n"
)
ROWS = {"rows.csv": base64.b64encode(b"k,v\na,0\nb,1\nc,2\na,3\nb,4\n").decode()}


def test_fifty_concurrent_data_science_runs_all_ok(science: Daemon) -> None:
    # BLAS from three threads, read_csv of a sent file, groupby, mathtext and a PNG:
    # under concurrency, no system call of theirs may be a seccomp kill.
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(
            pool.map(lambda _: science.run(BROAD_RUN, timeout=60, files=ROWS), range(50))
        )
    statuses = [a.get("status") for a in answers]
    assert statuses == ["ok"] * 50, [a for a in answers if a.get("status") != "ok"][:3]
    assert {a["stdout"] for a in answers} == {"{'a': 3, 'b': 5, 'c': 2} True\n"}
    assert all(len(a["images"]) == 1 and len(a["files"]) == 1 for a in answers)
    science.assert_healthy()


def test_cli_sends_files_and_writes_returned_figures_and_files(
    science: Daemon, tmp_path: Path
) -> None:
    data = tmp_path / "numbers.csv"
    data.write_text("v\n2\n3\n")
    out = tmp_path / "out"
    code = (
        "import pandas as pd, matplotlib.pyplot as plt\n"
        "total = int(pd.read_csv('numbers.csv')['v'].sum())\n"
        "open('/tmp/out/total.txt', 'w').write(str(total))\n"
        "plt.figure(figsize=(3, 2), dpi=100); plt.plot([total])\n"
        "print(total)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "sandboxd", "run", "--socket", science.socket_path,
         "--file", str(data), "--out", str(out), "-c", code],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "5\n"
    assert (out / "total.txt").read_text() == "5"
    assert png_size((out / "figure-1.png").read_bytes()) == (300, 200)
