"""`sandboxd mcp` driven by the MCP SDK's own stdio client, against a real daemon.

The client starts `python -m sandboxd mcp --socket ...` as a subprocess and speaks
MCP to it over stdio, as an agent host does; every tool call is a real jailed run.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import mcp_types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.integration.conftest import Daemon


@asynccontextmanager
async def mcp_session(socket_path: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "sandboxd", "mcp", "--socket", socket_path]
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def text_of(result: mcp_types.CallToolResult) -> str:
    assert len(result.content) == 1, result
    block = result.content[0]
    assert isinstance(block, mcp_types.TextContent), block
    return block.text


async def test_mcp_lists_a_tool_per_language_taking_code_stdin_timeout_files(
    daemon: Daemon,
) -> None:
    async with mcp_session(daemon.socket_path) as session:
        listed = await session.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == {"run_python", "run_javascript"}
    for tool in tools.values():
        assert set(tool.input_schema["properties"]) == {"code", "stdin", "timeout", "files"}
        assert tool.input_schema["required"] == ["code"]


async def test_mcp_runs_python_and_javascript_in_the_sandbox(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket_path) as session:
        python = await session.call_tool(
            "run_python",
            {"code": "import os, sys; print(sys.stdin.read()[::-1], os.getuid())", "stdin": "abc"},
        )
        node = await session.call_tool(
            "run_javascript", {"code": "console.log(6 * 7); console.error('to stderr')"}
        )
    assert not python.is_error, python
    text = text_of(python)
    assert text.startswith("status: ok\nexit_code: 0\n"), text
    stdout = text.split("--- stdout ---\n", 1)[1].split("\n--- stderr ---\n", 1)[0]
    reversed_stdin, uid = stdout.split()
    assert reversed_stdin == "cba"
    assert daemon.uid_min <= int(uid) <= daemon.uid_max  # a jailed worker's uid, not the host's
    assert not node.is_error, node
    assert "status: ok" in text_of(node)
    assert "--- stdout ---\n42\n\n--- stderr ---\nto stderr\n" in text_of(node)


async def test_mcp_sends_files_in_and_returns_the_files_the_run_wrote(daemon: Daemon) -> None:
    code = (
        "data = open('table.csv').read()\n"
        "open('/tmp/out/upper.txt', 'w').write(data.upper())\n"
        "print(len(data))"
    )
    async with mcp_session(daemon.socket_path) as session:
        files = {"table.csv": base64.b64encode(b"a,b\n").decode()}
        result = await session.call_tool("run_python", {"code": code, "files": files})
    assert not result.is_error, result
    verdict, returned = result.content
    assert isinstance(verdict, mcp_types.TextContent) and verdict.text.startswith("status: ok")
    assert isinstance(returned, mcp_types.TextContent), returned
    head, encoded = returned.text.split("\n", 1)
    assert head == "--- file upper.txt (application/octet-stream, base64) ---"
    assert base64.b64decode(encoded) == b"A,B\n"


async def test_mcp_reports_a_timeout_as_the_runs_verdict(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket_path) as session:
        result = await session.call_tool("run_python", {"code": "while True: pass", "timeout": 0.5})
    assert not result.is_error, result
    assert text_of(result).startswith("status: timeout\n"), text_of(result)


async def test_mcp_turns_a_refused_request_into_a_tool_error(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket_path) as session:
        refused = await session.call_tool("run_python", {"code": "print(1)", "timeout": -1})
        still = await session.call_tool("run_python", {"code": "print('after')"})
    assert refused.is_error, refused
    assert "sandboxd refused the run: bad_request" in text_of(refused)
    assert "timeout" in text_of(refused)
    assert "--- stdout ---\nafter\n" in text_of(still)
    daemon.assert_healthy()


async def test_mcp_says_so_when_the_daemon_is_unreachable() -> None:
    async with mcp_session("/nonexistent/sandboxd.sock") as session:
        result = await session.call_tool("run_python", {"code": "print(1)"})
    assert result.is_error, result
    assert "cannot reach the daemon at /nonexistent/sandboxd.sock" in text_of(result)
