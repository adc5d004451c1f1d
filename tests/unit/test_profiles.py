"""The import scan that sends a python3 job to the plain or the data-science pool, and
which warm modules make a data-science pool at all (datascience.installed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd import profiles
from sandboxd.runtimes import datascience

WARM = ["numpy", "pandas", "matplotlib.pyplot"]


@pytest.mark.parametrize(
    "code",
    [
        "import numpy as np",
        "import os, pandas",
        "from matplotlib import pyplot as plt",
        "def main():\n    import numpy\n    return 1",
        "import matplotlib.pyplot as plt",
        "from pandas.api import types",
        "\timport numpy",
        "import json; import numpy",
    ],
)
def test_code_importing_a_warm_package_goes_to_the_science_pool(code: str) -> None:
    assert profiles.choose(("", code), WARM) == profiles.SCIENCE


@pytest.mark.parametrize(
    "code",
    [
        "print('import numpy')",
        "import numpyx",
        "import json\nx = 'numpy'",
        "# numpy\nimport os",
        "from . import numpy",
        "",
    ],
)
def test_code_without_such_an_import_stays_plain(code: str) -> None:
    assert profiles.choose(("", code), WARM) == profiles.PLAIN


def test_the_preload_counts_too() -> None:
    assert profiles.choose(("import pandas", "print(1)"), WARM) == profiles.SCIENCE


def test_no_warm_modules_means_plain() -> None:
    assert profiles.choose(("", "import numpy"), []) == profiles.PLAIN


def test_hostile_input_is_scanned_in_one_pass() -> None:
    nested = "(" * 200_000 + "import numpy" + ")" * 200_000
    many = "import " + ",".join(["os"] * 100_000) + ", numpy"
    assert profiles.choose(("", nested), WARM) == profiles.PLAIN
    assert profiles.choose(("", many), WARM) == profiles.SCIENCE


def test_warm_modules_count_only_when_the_jail_can_import_them(tmp_path: Path) -> None:
    (tmp_path / "pandas").mkdir()
    (tmp_path / "pandas" / "__init__.py").write_text("")
    (tmp_path / "single.py").write_text("")
    packaged = ["/usr/lib/python3/dist-packages/numpy", "/usr/lib/python3/dist-packages/six.py"]
    modules = ["numpy", "pandas", "matplotlib.pyplot", "single", "six", "scipy"]
    assert datascience.installed(modules, str(tmp_path), packaged) == [
        "numpy",
        "pandas",
        "single",
        "six",
    ]
    assert datascience.installed(modules, None, []) == []
    assert datascience.installed(WARM, None, packaged) == ["numpy"]
