"""Theory-of-operation docstrings name only what exists.

The module docstrings that explain how the daemon works (MODULES) name files
(`pool.py`), functions (`build()`), classes (`WorkerHandle`) and attributes
(`Dispatcher.run`, `difyapi.refusal`). Each such name is looked up in the
package's own source (its AST): a rename that leaves a docstring behind fails here.
Names of other libraries (`trio.serve_listeners`, `os.fork()`) are not checked.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "sandboxd"
MODULES = (
    "sandboxd.admission",
    "sandboxd.deps",
    "sandboxd.dispatcher",
    "sandboxd.generation",
    "sandboxd.http",
    "sandboxd.jail",
    "sandboxd.jail.cgroup",
    "sandboxd.jail.contain",
    "sandboxd.jail.rootfs",
    "sandboxd.metrics",
    "sandboxd.pool",
    "sandboxd.runtimes",
    "sandboxd.seccomplog",
    "sandboxd.server",
    "sandboxd.succession",
    "sandboxd.verdict",
    "sandboxd.worker",
    "sandboxd.zygote",
)
FILE = re.compile(r"\b((?:[a-z_]+/)*[a-z_0-9]+\.py)\b")
CALL = re.compile(r"(?<![\w.])([A-Za-z_][\w.]*)\(\)")
DOTTED = re.compile(r"(?<![\w./])([A-Za-z_]\w*)\.([A-Za-z_]\w*)\b")
# Suffixes of file names, not members.
SUFFIXES = {"py", "md", "cc", "js", "toml", "txt", "sock", "yml"}
CAMEL = re.compile(r"\b([A-Z][a-z]+(?:[A-Z][a-z0-9]*)+)\b")


def _defined() -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
    """Every class with its members, every module with its top-level names, and every
    function, method and class name in the package."""
    classes: dict[str, set[str]] = {}
    modules: dict[str, set[str]] = {}
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top: set[str] = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                top.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                top.update(t.id for t in targets if isinstance(t, ast.Name))
        module = "__init__" if path.stem == "__init__" else path.stem
        modules.setdefault(module if module != "__init__" else path.parent.name, set()).update(top)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                names.add(node.name)
                members = classes.setdefault(node.name, set())
                for item in ast.walk(node):
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        members.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members.add(item.target.id)
                    elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store):
                        members.add(item.attr)
    return classes, modules, names


CLASSES, TOP_LEVEL, NAMES = _defined()


def _missing(doc: str) -> list[str]:
    missing = []
    for ref in FILE.findall(doc):
        roots = (PACKAGE.parent, PACKAGE, PACKAGE / "jail", PACKAGE / "runtimes")
        if not any((root / ref).exists() for root in roots):
            missing.append(ref)
    for owner, member in DOTTED.findall(doc):
        members = CLASSES.get(owner, TOP_LEVEL.get(owner))
        if members is not None and member not in members and member not in SUFFIXES:
            missing.append(f"{owner}.{member}")
    for call in CALL.findall(doc):
        owner, _, name = call.rpartition(".")
        if not owner and name not in NAMES:
            missing.append(f"{name}()")
    for camel in CAMEL.findall(doc):
        if camel not in CLASSES and camel not in {n for m in TOP_LEVEL.values() for n in m}:
            missing.append(camel)
    return sorted(missing)


@pytest.mark.parametrize("module", MODULES)
def test_a_theory_of_operation_names_only_what_exists(module: str) -> None:
    doc = importlib.import_module(module).__doc__
    assert doc, f"{module} has no docstring"
    assert _missing(doc) == [], module


def test_the_check_catches_a_stale_name() -> None:
    stale = "`prepare_python()` in rootfs.py builds a Zygote; pool.Dispatcher runs it (gone.py)"
    assert _missing(stale) == ["gone.py", "pool.Dispatcher", "prepare_python()"]


def test_the_readme_map_names_files_that_exist() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    start = readme.index("## How it works")
    table = readme[start : readme.index("In short:", start)]
    named = re.findall(r"`((?:[a-z_0-9]+/)*[a-z_0-9]+\.(?:py|js))`", table)
    assert len(named) > 10, table
    assert [name for name in named if not (PACKAGE / name).exists()] == []
    functions = re.findall(r"`([a-z_]+)`", table)
    assert functions and [name for name in functions if name not in NAMES] == []
