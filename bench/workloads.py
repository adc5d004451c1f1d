"""The snippets the bench runs, each with the exact stdout a correct run prints.

A run counts as ok only when the daemon (or a baseline) says it exited 0 *and*
its stdout is exactly ``expected``: a fast wrong answer is an error, not a win.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

from sandboxd.protocol import Language


@dataclass(frozen=True)
class Workload:
    key: str  # short name for --workloads
    title: str  # what the table prints
    language: Language
    code: str
    expected: str  # stdout of a correct run, byte for byte
    # What the spawn-per-run baselines run instead of `code` ("" for the same code).
    baseline_code: str = ""
    # Imports the jail's environment (numpy, pandas, matplotlib): the `python3 -c`
    # baseline gets the same site-packages on PYTHONPATH.
    science: bool = False


# Dify's user code and inputs (the default "sum" example of a code node).
_DIFY_INPUTS = {"a": 1, "b": 2}
_DIFY_OUTPUT = {"sum": 3}


def _dify_b64() -> str:
    return base64.b64encode(json.dumps(_DIFY_INPUTS).encode()).decode()


def dify_python() -> Workload:
    """Dify's current python3 template around `def main(a, b)` (spec/dify-sandbox-api.md)."""
    code = (
        "def main(a, b):\n"
        '    return {"sum": a + b}\n'
        "\n"
        "import json\n"
        "from base64 import b64decode\n"
        f"inputs_obj = json.loads(b64decode('{_dify_b64()}').decode('utf-8'))\n"
        "output_obj = main(**inputs_obj)\n"
        "output_json = json.dumps(output_obj, indent=4)\n"
        "result = f'''<<RESULT>>{output_json}<<RESULT>>'''\n"
        "print(result)\n"
    )
    expected = f"<<RESULT>>{json.dumps(_DIFY_OUTPUT, indent=4)}<<RESULT>>\n"
    return Workload("py-dify", "python3 dify template", "python3", code, expected)


def dify_nodejs() -> Workload:
    """Dify's JavaScript template around `function main({a, b})`."""
    code = (
        "function main({a, b}) {\n"
        "    return {sum: a + b}\n"
        "}\n"
        "\n"
        f"var inputs_obj = JSON.parse(Buffer.from('{_dify_b64()}', 'base64')"
        ".toString('utf-8'))\n"
        "var output_obj = main(inputs_obj)\n"
        "console.log(`<<RESULT>>${JSON.stringify(output_obj)}<<RESULT>>`)\n"
    )
    expected = f"<<RESULT>>{json.dumps(_DIFY_OUTPUT, separators=(',', ':'))}<<RESULT>>\n"
    return Workload("node-dify", "nodejs dify template", "nodejs", code, expected)


def loop_code(iterations: int) -> str:
    """Module-level code (as a run executes it): a summing loop, then its result."""
    return f"s = 0\nfor i in range({iterations}):\n    s += i\nprint(s)\n"


def compute(iterations: int) -> Workload:
    expected = f"{iterations * (iterations - 1) // 2}\n"
    return Workload("py-loop5ms", "python3 ~5 ms loop", "python3", loop_code(iterations), expected)


def _loop_seconds(iterations: int, repeats: int) -> float:
    """Best-of-`repeats` time of the loop body, executed as module code like a run."""
    body = compile(loop_code(iterations).replace("print(s)\n", ""), "<loop>", "exec")
    best = float("inf")
    for _ in range(repeats):
        namespace: dict[str, object] = {}
        start = time.perf_counter()
        exec(body, namespace)
        best = min(best, time.perf_counter() - start)
    return best


def calibrate_loop(target_ms: float = 5.0, rounds: int = 4) -> tuple[int, float]:
    """Iterations that take about `target_ms` in this (plain CPython) interpreter.

    A few rounds of measure-and-rescale at the target size, best of several runs
    each, so one noisy sample does not skew it. Returns the iteration count and
    the time it then measured, in ms.
    """
    iterations = 20_000
    for _ in range(rounds):
        seconds = _loop_seconds(iterations, repeats=5)
        iterations = max(1, round(iterations * target_ms / 1000 / seconds))
    return iterations, _loop_seconds(iterations, repeats=5) * 1000


_PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [2, 1, 3])\nprint('plotted')\n"


def science_workloads() -> list[Workload]:
    """numpy, a small DataFrame and a line plot (only with --workloads: they need an
    environment holding those packages, e.g. --state-dir of a synced one). sandboxd
    returns the open figure as PNG by itself; the baseline renders it explicitly."""
    return [
        Workload(
            "py-numpy", "python3 numpy", "python3",
            "import numpy as np\nprint(int((np.arange(100.0) @ np.ones(100)).item()))\n",
            "4950\n", science=True,
        ),
        Workload(
            "py-pandas", "python3 pandas DataFrame", "python3",
            "import pandas as pd\nframe = pd.DataFrame({'a': [1, 2, 3], 'b': [4, 5, 6]})\n"
            "print(int(frame.groupby('a')['b'].sum().sum()))\n",
            "15\n", science=True,
        ),
        Workload(
            "py-plot", "python3 plot as PNG", "python3", _PLOT, "plotted\n",
            baseline_code="import io\n" + _PLOT + "plt.savefig(io.BytesIO(), format='png')\n",
            science=True,
        ),
    ]  # fmt: skip


# What the bench sends to see whether a daemon answers at all.
READY = Workload("ready", "ready probe", "python3", 'print("ready")\n', "ready\n")


def all_workloads(loop_iterations: int) -> list[Workload]:
    return [
        Workload("py-hello", "python3 hello", "python3", 'print("hello")\n', "hello\n"),
        compute(loop_iterations),
        dify_python(),
        Workload("node-hello", "nodejs hello", "nodejs", 'console.log("hello")\n', "hello\n"),
        dify_nodejs(),
    ]
