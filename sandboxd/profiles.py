"""Whether a job is for a runtime with warm modules (the data-science one, whose
template has [python3] warm_modules imported): imports_any(), its record's `claims`.

The choice is a cheap scan of the code's import statements: one pass over its
lines, string methods only (no parser, no regular expression, nothing that can
recurse or backtrack on user input). A run the scan misses (e.g. __import__ of a
computed name) still works in the plain pool, only slower; a run it picks wrongly
still works in the warm pool.
"""

from __future__ import annotations

PLAIN = ""
SCIENCE = "science"


def _imported(line: str) -> list[str]:
    """Top-level package names the `import a.b, c as d` and `from a.b import c`
    statements of one line name (statements split at ";")."""
    found: list[str] = []
    for statement in line.replace("\t", " ").split(";"):
        words = statement.strip()
        if words.startswith("import "):
            names = words[len("import ") :].split(",")
        elif words.startswith("from "):
            names = [words[len("from ") :].split(" ", 1)[0]]
        else:
            continue
        found += [name.strip().split(" ", 1)[0].split(".")[0] for name in names]
    return found


def imports_any(sources: tuple[str, ...], warm_modules: list[str]) -> bool:
    """Whether any of the sources imports a top-level package of warm_modules."""
    warm = {name.split(".")[0] for name in warm_modules}
    if not warm:
        return False
    for source in sources:
        for line in source.splitlines():
            if warm.intersection(_imported(line)):
                return True
    return False


def choose(sources: tuple[str, ...], warm_modules: list[str]) -> str:
    """SCIENCE when any of the sources imports a top-level package of warm_modules."""
    return SCIENCE if imports_any(sources, warm_modules) else PLAIN
