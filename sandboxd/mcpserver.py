"""`sandboxd mcp`: a Model Context Protocol server on stdio for LLM agents.

The agent host starts this process as its own user; each tool call becomes one
native request on the daemon's Unix socket, so the socket's permissions (0660
root:sandboxd) decide who may run code, exactly as for `sandboxd run`. This
process holds no privilege and runs no code itself.

Tools (one per language in ``TOOLS``): ``run_python`` and ``run_javascript``,
each taking ``code`` with optional ``stdin``, ``timeout`` and ``files`` (name ->
base64, written into the run's working directory). A run that took place,
whatever its verdict, answers with text (the verdict, stdout, stderr), then one
image content per figure the run left open, then one text per file it wrote
under /tmp/out (base64); a request the daemon refused (bad_request, overloaded,
...) answers with an MCP tool error carrying the daemon's code and message.

Built on the official ``mcp`` SDK (an optional dependency: ``pip install
'sandboxd[mcp]'``); the SDK runs on anyio, which runs it here on trio.
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from sandboxd.protocol import ErrorReply, Language, RunResult

# The native language each tool runs, and what the tool tells the model.
TOOLS: dict[str, tuple[Language, str]] = {
    "run_python": (
        "python3",
        "Run Python 3 code in a fresh, isolated sandbox (no network, no files kept). "
        "Returns the verdict, the exit code, stdout and stderr.",
    ),
    "run_javascript": (
        "nodejs",
        "Run JavaScript (Node.js) code in a fresh, isolated sandbox (no network, no "
        "files kept). Returns the verdict, the exit code, stdout and stderr.",
    ),
}
# The longest answer line read from the daemon (its output cap keeps results far below).
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class Refused(Exception):
    """The daemon refused the request, or could not be reached: a tool error."""


def native_request(
    language: Language,
    code: str,
    stdin: str | None,
    timeout: float | None,
    files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The native request for one tool call; optional fields only when given (the
    daemon checks them: a bad file name or bad base64 is its bad_request)."""
    request: dict[str, Any] = {"language": language, "code": code}
    if stdin is not None:
        request["stdin"] = stdin
    if timeout is not None:
        request["timeout"] = timeout
    if files:
        request["files"] = files
    return request


def decode_answer(line: bytes) -> RunResult | ErrorReply:
    """The daemon's answer line as a result or an error reply (Refused if neither)."""
    try:
        raw = msgspec.json.decode(line)
        if isinstance(raw, dict) and "error" in raw:
            return msgspec.convert(raw, ErrorReply)
        return msgspec.convert(raw, RunResult)
    except msgspec.DecodeError as error:  # ValidationError is a DecodeError
        raise Refused(f"the daemon sent an answer this client cannot read: {error}") from error


def result_text(result: RunResult) -> str:
    """What the model reads: the verdict first, then the output streams."""
    verdict = f"status: {result.status}"
    if result.exit_code is not None:
        verdict += f"\nexit_code: {result.exit_code}"
    if result.signal is not None:
        verdict += f"\nsignal: {result.signal}"
    if result.message:
        verdict += f"\nmessage: {result.message}"
    if result.truncated:
        verdict += "\ntruncated: output exceeded the limit and was cut"
    verdict += f"\nwall_ms: {result.wall_ms:.1f}"
    return f"{verdict}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


async def exchange(socket_path: str, request: dict[str, Any]) -> bytes:
    """Send one request on a fresh connection to the daemon; its answer line."""
    try:
        stream = await trio.open_unix_socket(socket_path)
    except OSError as error:
        raise Refused(f"cannot reach the daemon at {socket_path}: {error}") from error
    async with stream:
        await stream.send_all(msgspec.json.encode(request) + b"\n")
        data = bytearray()
        while b"\n" not in data:
            if len(data) > MAX_ANSWER_BYTES:
                raise Refused("the daemon's answer is larger than this client reads")
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise Refused("the daemon closed the connection without an answer")
            data += chunk
    return bytes(data.split(b"\n", 1)[0])


def result_content(result: RunResult) -> list[Any]:
    """The MCP content of a result: its text, each figure as an image, each file it
    wrote as a text holding the file's base64 (needs the SDK's types)."""
    from mcp.types import ImageContent, TextContent

    content: list[Any] = [TextContent(type="text", text=result_text(result))]
    content.extend(
        ImageContent(type="image", data=image.base64, mime_type=image.mime)
        for image in result.images
    )
    content.extend(
        TextContent(type="text", text=f"--- file {item.name} ({item.mime}, base64) ---\n"
                    f"{item.base64}")
        for item in result.files
    )  # fmt: skip
    return content


async def run_tool(socket_path: str, request: dict[str, Any]) -> list[Any]:
    """One tool call: the result's content, or Refused with the daemon's reason."""
    answer = decode_answer(await exchange(socket_path, request))
    if isinstance(answer, ErrorReply):
        raise Refused(f"sandboxd refused the run: {answer.error.code}: {answer.error.message}")
    return result_content(answer)


def _tool(socket_path: str, language: Language) -> Any:
    """The handler of one tool; its signature is the tool's input schema."""

    async def handler(
        code: str,
        stdin: str | None = None,
        timeout: float | None = None,
        files: dict[str, str] | None = None,
    ) -> list[Any]:
        from mcp.server.mcpserver.exceptions import ToolError

        request = native_request(language, code, stdin, timeout, files)
        try:
            return await run_tool(socket_path, request)
        except Refused as error:
            raise ToolError(str(error)) from error

    return handler


def build_server(socket_path: str) -> Any:
    """The MCP server with one tool per entry of TOOLS, forwarding to `socket_path`."""
    from mcp.server.mcpserver import MCPServer

    from sandboxd import __version__

    server = MCPServer(
        name="sandboxd",
        version=__version__,
        instructions="Runs code in sandboxd's jailed workers; each call is a fresh sandbox.",
    )
    for name, (language, description) in TOOLS.items():
        server.add_tool(
            _tool(socket_path, language),
            name=name,
            description=description,
            structured_output=False,
        )
    return server


MISSING_SDK = (
    "sandboxd mcp needs the MCP Python SDK (mcp>=2,<3), which this environment lacks "
    "(the .deb's private one does not carry it): install sandboxd with it into a "
    "virtualenv of your own (pip install '/path/to/sandboxd-checkout[mcp]') and run "
    "that environment's `sandboxd mcp`"
)


def main(socket_path: str) -> int:
    """Serve MCP on stdin/stdout until the host closes stdin."""
    try:
        server = build_server(socket_path)
    except ImportError:
        import sys

        print(MISSING_SDK, file=sys.stderr)
        return 1
    trio.run(server.run_stdio_async)
    return 0
