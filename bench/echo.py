"""A stand-in daemon that runs nothing: it measures the bench client's own ceiling.

`python -m bench --echo` starts it in place of sandboxd. It speaks the native
protocol with sandboxd's own sans-IO code and answers each known snippet at
once with the stdout a real run prints (from an answers file the bench
writes), so a cell against it shows what the client and the protocol cost
with no run at all. Unknown code gets status "error", so nothing passes by
accident.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import trio

from sandboxd.protocol import (
    ErrorReply,
    LineBuffer,
    LineTooLong,
    ProtocolError,
    RunResult,
    decode_request,
    encode,
)

MAX_LINE = 16 * 1024 * 1024


def answer(line: bytes, answers: dict[str, str]) -> RunResult | ErrorReply:
    request = decode_request(line)
    if isinstance(request, ErrorReply):
        return request
    stdout = answers.get(request.code)
    return RunResult(
        id=request.id,
        status="ok" if stdout is not None else "error",
        exit_code=0 if stdout is not None else 1,
        signal=None,
        stdout=stdout or "",
        stderr="" if stdout is not None else "echo server: unknown code",
        truncated=False,
        wall_ms=0.0,
        cpu_ms=0.0,
        peak_memory_bytes=None,
    )


async def serve_connection(stream: trio.SocketStream, answers: dict[str, str]) -> None:
    buffer = LineBuffer(MAX_LINE)
    async with stream:
        while True:  # ends at EOF or on a line over the cap
            data = await stream.receive_some(256 * 1024)
            if not data:
                return
            try:
                lines = buffer.feed(data)
            except LineTooLong:
                await stream.send_all(
                    encode(ProtocolError("too_large", "line too long").reply(None))
                )
                return
            if lines:
                await stream.send_all(b"".join(encode(answer(line, answers)) for line in lines))


async def serve(
    socket_path: str,
    answers: dict[str, str],
    lifetime: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves until cancelled or `lifetime` seconds have passed; started once it listens."""
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(socket_path)
    listener.listen(128)
    task_status.started()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_connection(stream, answers)

    with trio.move_on_after(lifetime):
        await trio.serve_listeners(handler, [trio.SocketListener(listener)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--answers", required=True, type=Path, help="JSON {code: stdout}")
    parser.add_argument("--lifetime", type=float, default=1800.0, help="seconds, then exit")
    args = parser.parse_args()
    answers = json.loads(args.answers.read_text())
    trio.run(serve, args.socket, answers, args.lifetime)


if __name__ == "__main__":
    main()
