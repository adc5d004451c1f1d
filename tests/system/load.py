"""A client that keeps sending python3 runs to sandboxd while the test operates it.

Runs inside the guest (/usr/bin/python3, stdlib only):

    python3 load.py SOCKET STOPFILE PROGRESSFILE

One connection per request (so every request sees the listening socket as it
is at that moment), until STOPFILE exists. Each request ends as one of:
  ok       an answer with status "ok"
  error    an answer that is an error reply or another status
  refused  connect() failed (no one listening, socket file gone)
  silent   the connection closed before any answer
After each request PROGRESSFILE holds the number done; the summary is one
JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import socket
import sys


def one(path: str, number: int) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        # A run sent during a restart waits for the new daemon's start, which may take
        # up to TimeoutStartSec (300 s): under emulation the data-science template's
        # imports made a start take 116-167 s, past the 120 s this waited before.
        sock.settimeout(300)
        try:
            sock.connect(path)
        except OSError:
            return "refused"
        request = {"id": number, "language": "python3", "code": f"print({number})"}
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                return "silent"
            data += chunk
    reply = json.loads(data)
    ok = reply.get("status") == "ok" and reply.get("stdout") == f"{number}\n"
    return "ok" if ok else "error"


def main() -> None:
    path, stop, progress = sys.argv[1:4]
    counts = {"ok": 0, "error": 0, "refused": 0, "silent": 0}
    number = 0
    while not os.path.exists(stop):
        number += 1
        counts[one(path, number)] += 1
        with open(progress + ".tmp", "w") as handle:
            handle.write(str(number))
        os.replace(progress + ".tmp", progress)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
