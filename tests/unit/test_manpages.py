"""sandboxd(8) and sandboxd.toml(5) are generated and complete: every subcommand,
option and config key appears, with the config's own defaults, and groff reads
both pages without a warning."""

from __future__ import annotations

import argparse
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from sandboxd import manpages
from sandboxd.cli import parser
from sandboxd.config import DIFY_ENV, Config


def commands(
    top: argparse.ArgumentParser, prefix: str = "sandboxd"
) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand, nested ones included ("sandboxd deps sync"), with its parser."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix} {name}"] = sub
                found.update(commands(sub, f"{prefix} {name}"))
    return found


def unroff(page: str) -> str:
    return page.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")


def test_sandboxd_8_has_every_subcommand_and_option() -> None:
    page = unroff(manpages.sandboxd_8(parser()))
    found = commands(parser())
    assert {"sandboxd serve", "sandboxd run", "sandboxd check", "sandboxd mcp",
            "sandboxd deps sync", "sandboxd deps list"} <= set(found)  # fmt: skip
    for name, sub in found.items():
        assert f".SS {name}\n" in page, name
        section = page.split(f".SS {name}\n", 1)[1].split("\n.SS ", 1)[0]
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            for option in action.option_strings:
                assert option in section, (name, option)
            if action.help:
                assert (action.help % {"default": action.default}) in section, (name, action.dest)


def test_sandboxd_toml_5_has_every_key_with_its_default() -> None:
    page = unroff(manpages.sandboxd_toml_5())
    config = Config()
    keys = 0
    for section in config.__struct_fields__:
        assert f"\n.SH [{section}]\n" in page, section
        body = page.split(f"\n.SH [{section}]\n", 1)[1].split("\n.SH ", 1)[0]
        struct = getattr(config, section)
        for key in struct.__struct_fields__:
            match = re.search(rf"^\\fB{key}\\fR = (.+)$", body, re.MULTILINE)
            assert match is not None, f"{section}.{key}"
            assert tomllib.loads(f"v = {match.group(1)}")["v"] == getattr(struct, key), key
            keys += 1
    assert keys == len(manpages.config_reference())
    for override in DIFY_ENV:
        assert f"\\fB{override.variable}\\fR\n{override.key}" in page


def test_every_key_has_its_comment_as_description() -> None:
    descriptions = {f"{s}.{k}": d for s, k, _, d in manpages.config_reference()}
    assert descriptions["limits.max_workers"] == (
        "Runs executing at once, over all languages (dify-sandbox: MAX_WORKERS)."
    )
    assert all(descriptions.values())


@pytest.mark.parametrize("name", ["sandboxd.8", "sandboxd.toml.5"])
def test_groff_reads_the_pages_without_a_warning(tmp_path: Path, name: str) -> None:
    assert manpages.main([str(tmp_path)]) == 0
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(tmp_path / name)], capture_output=True, text=True
    )
    assert (result.returncode, result.stderr) == (0, "")
