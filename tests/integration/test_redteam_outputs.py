"""Red team: the files a run returns, as `sandboxd run --out DIR` saves them.

The names are the run's choice (what it wrote under /tmp/out, or a trailer it
forged), so a run that names a file the user already keeps in DIR (`.bashrc`, a
figure's name) must not replace it: the run's text spells the marker, which must
never reach the host file. A name with a path in it is refused whole.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import Daemon
from tests.integration.tenants import MARKER

PLANT = f"""
import os
for name in (".bashrc", "notes.txt", "new.txt"):
    with open(os.path.join("/tmp/out", name), "w") as handle:
        handle.write({MARKER[:4]!r} + {MARKER[4:]!r})
print("planted")
"""


def _run_cli(daemon: Daemon, out: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxd", "run", "--socket", daemon.socket_path,
         "--out", str(out), "-c", code],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_returned_files_never_replace_what_the_out_dir_holds(
    daemon: Daemon, tmp_path: Path
) -> None:
    out = tmp_path / "home"
    out.mkdir()
    (out / ".bashrc").write_text("the user's own\n")
    (out / "notes.txt").write_text("the user's notes\n")
    done = _run_cli(daemon, out, PLANT)
    assert done.stdout == "planted\n", done
    assert done.returncode != 0 and "File exists" in done.stderr, done
    assert (out / ".bashrc").read_text() == "the user's own\n"
    assert (out / "notes.txt").read_text() == "the user's notes\n"
    daemon.assert_healthy()


def test_a_returned_file_comes_back_into_an_empty_out_dir(daemon: Daemon, tmp_path: Path) -> None:
    """The control: the same run's files are written where nothing is in the way."""
    out = tmp_path / "empty"
    done = _run_cli(daemon, out, PLANT)
    assert done.returncode == 0, done
    assert (out / "new.txt").read_text() == MARKER
