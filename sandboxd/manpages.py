"""sandboxd(8) and sandboxd.toml(5), generated: never edited by hand.

sandboxd(8) is rendered from the argparse parser that prints ``--help``
(sandboxd.cli), so every subcommand and option appears with the same words;
sandboxd.toml(5) from the config structs (sandboxd.config): each key with its
default and the comment above its field, the same source the README's key
table is checked against, and the environment overrides from DIFY_ENV.

``python -m sandboxd.manpages DIR`` writes both into DIR (the .deb's build
does, and dh_installman installs them).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path

import msgspec

from sandboxd import __version__
from sandboxd.config import DEFAULT_CONFIG_PATH, DIFY_ENV, Config

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:")


def _roff(text: str) -> str:
    """Text as roff: backslashes and hyphens escaped, no line starting a request."""
    escaped = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in escaped.splitlines()
    )


def _literal(text: str) -> str:
    """A block printed as written (no filling)."""
    return f".nf\n{_roff(text.rstrip())}\n.fi"


def _toml(key: str, value: object) -> str:
    """A default as it is written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and key.endswith("_mode"):
        return oct(value)
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def config_reference() -> list[tuple[str, str, str, str]]:
    """(section, key, default as TOML, description) of every key, in struct order.

    The description is the comment block right above the field in its struct.
    """
    config = Config()
    rows: list[tuple[str, str, str, str]] = []
    for section in msgspec.structs.fields(Config):
        struct = getattr(config, section.name)
        comments: dict[str, str] = {}
        pending: list[str] = []
        for line in inspect.getsource(type(struct)).splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped.lstrip("#").strip())
            elif match := _FIELD_LINE.match(line):
                comments[match.group(1)] = " ".join(pending)
                pending = []
            else:
                pending = []
        for field in msgspec.structs.fields(type(struct)):
            description = comments.get(field.name, "")
            if not description:
                raise ValueError(f"{section.name}.{field.name} has no comment to document it")
            default = _toml(field.name, getattr(struct, field.name))
            rows.append((section.name, field.name, default, description))
    return rows


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        choices = "{" + ",".join(map(str, action.choices)) + "}" if action.choices else None
        if action.option_strings:
            names = ", ".join(action.option_strings)
            metavar = action.metavar or choices or action.dest.upper()
            label = names if action.nargs == 0 else f"{names} {metavar}"
        else:
            label = str(action.metavar or choices or action.dest)
        help_text = (action.help or "") % {"default": action.default, "prog": parser.prog}
        lines += [".TP", f"\\fB{_roff(label)}\\fR", _roff(help_text)]
    return lines


def _command(name: str, parser: argparse.ArgumentParser, level: str) -> list[str]:
    lines = [f".{level} {_roff(name)}", _literal(parser.format_usage().removeprefix("usage: "))]
    if parser.description:
        lines += [".PP", _roff(parser.description)]
    lines += _options(parser)
    for child, subparser in _subcommands(parser).items():
        lines += _command(f"{name} {child}", subparser, "SS")
    return lines


def _header(name: str, section: int, title: str) -> list[str]:
    return [
        f'.TH {name.upper()} {section} "" "sandboxd {__version__}" "{title}"',
        ".SH NAME",
        f"{_roff(name)} \\- {_roff(title)}",
    ]


def sandboxd_8(parser: argparse.ArgumentParser) -> str:
    """The page of the `sandboxd` command, from its argparse parser."""
    lines = _header("sandboxd", 8, "run untrusted code in jailed, warm workers")
    lines += [".SH SYNOPSIS", _literal(parser.format_usage().removeprefix("usage: "))]
    lines += [".SH DESCRIPTION", _roff(parser.description or "")]
    lines += [".SH OPTIONS", *_options(parser), ".SH COMMANDS"]
    for name, subparser in _subcommands(parser).items():
        lines += _command(f"sandboxd {name}", subparser, "SS")
    lines += [".SH NOTES", _literal(parser.epilog or "")]
    lines += [".SH SEE ALSO", "\\fBsandboxd.toml\\fR(5), \\fBsystemctl\\fR(1), \\fBhaproxy\\fR(1)"]
    return "\n".join(lines) + "\n"


def sandboxd_toml_5() -> str:
    """The page of the configuration file, from the config structs."""
    lines = _header("sandboxd.toml", 5, "sandboxd configuration file")
    lines += [
        ".SH DESCRIPTION",
        f"sandboxd reads {_roff(DEFAULT_CONFIG_PATH)} (or the file given to \\fB\\-\\-config\\fR),"
        " a TOML file of the sections and keys below. Every key is optional and has the"
        " default shown; an unknown key or a wrong type is an error naming the key and line.",
    ]
    section = ""
    for name, key, default, description in config_reference():
        if name != section:
            section = name
            lines.append(f".SH [{_roff(name)}]")
        lines += [".TP", f"\\fB{_roff(key)}\\fR = {_roff(default)}", _roff(description)]
    lines += [
        ".SH ENVIRONMENT",
        "Variables override the file. \\fBSANDBOXD_\\fISECTION\\fB_\\fIKEY\\fR sets any key"
        " (e.g. SANDBOXD_LIMITS_MEMORY_MB); the names dify\\-sandbox users know set these:",
    ]
    for override in DIFY_ENV:
        lines += [".TP", f"\\fB{_roff(override.variable)}\\fR", _roff(override.key)]
    lines += [".SH SEE ALSO", "\\fBsandboxd\\fR(8)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from sandboxd.cli import parser

    if len(argv) != 1:
        print("usage: python -m sandboxd.manpages DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "sandboxd.8").write_text(sandboxd_8(parser()))
    (out / "sandboxd.toml.5").write_text(sandboxd_toml_5())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
