"""Two colluding runs at once against the packaged daemon, inside the guest (kernel 6.1).

Runs inside the guest (/usr/bin/python3, stdlib only), from the payload disk
that also holds collusion_fs_cases.py (the attack code the integration tests
send on the host):

    python3 collusion.py SOCKET

For each case it sends the two runs at the same time, each on its own
connection to the native socket, and checks that they overlapped (each run
prints CLOCK_MONOTONIC when it starts and exits), that the marker is in
neither answer, and the case's own condition. Prints one line per case and
exits non-zero if any failed.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import collusion_fs_cases as cases

MARKER = "ESCAPED-GUEST-51c2"
STAMPS = (
    "import atexit as _a, time as _t\n"
    "print('START', _t.monotonic(), flush=True)\n"
    "_a.register(lambda: print('END', _t.monotonic(), flush=True))\n"
)

Answer = dict[str, Any]


def run(path: str, code: str, timeout: float) -> Answer:
    request = {"language": "python3", "code": STAMPS + code.replace("MARKER", MARKER)}
    request["timeout"] = timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(120)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: Answer = json.loads(data.split(b"\n", 1)[0])
    return answer


def interval(answer: Answer) -> tuple[float, float] | None:
    stamps = {}
    for line in str(answer.get("stdout", "")).splitlines():
        word, _, value = line.partition(" ")
        if word in ("START", "END"):
            stamps[word] = float(value)
    return (stamps["START"], stamps["END"]) if len(stamps) == 2 else None


def together(path: str, a: tuple[str, float], b: tuple[str, float]) -> list[Answer]:
    answers: list[Answer] = [{}, {}]

    def send(index: int, code: str, timeout: float) -> None:
        try:
            answers[index] = run(path, code, timeout)
        except (OSError, ValueError) as error:
            answers[index] = {"error": repr(error)}

    threads = [threading.Thread(target=send, args=(i, *t)) for i, t in enumerate((a, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def _holder_held_nothing(answers: list[Answer]) -> str:
    return "" if "holding []" in answers[0].get("stdout", "") else "a lock was taken"


def _watches_refused(answers: list[Answer]) -> str:
    out = answers[1].get("stdout", "")
    return "" if "dnotify refused" in out and "inotify refused" in out else "a watch was set"


def _giver_timed_out(answers: list[Answer]) -> str:
    held = "holding the other run's stdout" in answers[1].get("stdout", "")
    if held and answers[0].get("status") != "timeout":
        return f"the run whose stdout was held got {answers[0].get('status')}"
    return ""


def _nothing(answers: list[Answer]) -> str:
    return ""


# name -> (sender code, timeout), (receiver code, timeout), extra condition
CASES: dict[str, tuple[tuple[str, float], tuple[str, float], Callable[[list[Answer]], str]]] = {
    "root-fd-walk": ((cases.SEND_ROOT_FD, 10), (cases.WALK_TO_HOST, 10), _nothing),
    "locks": ((cases.HOLD_LOCKS, 10), (cases.PROBE_LOCKS, 10), _holder_held_nothing),
    "watches": ((cases.READ_WATCHED["python3"], 10), (cases.WATCH, 10), _watches_refused),
    "dev-shm": ((cases.SHM_WRITE, 10), (cases.SHM_LOOK, 10), _nothing),
    "stdout-past-deadline": (
        (cases.GIVE_STDOUT, 2),
        (cases.WRITE_INTO_OTHER, 12),
        _giver_timed_out,
    ),
}


def check(path: str, name: str) -> str:
    """'' when the case passed, else what went wrong."""
    a, b, extra = CASES[name]
    answers = together(path, a, b)
    for answer in answers:
        if "stdout" not in answer:
            return f"no result: {answer}"
        if MARKER in answer["stdout"] or MARKER in answer.get("stderr", ""):
            return f"escaped: {answer}"
    first, second = interval(answers[0]), interval(answers[1])
    if first is None or second is None:
        return f"a run did not start or end: {answers}"
    if not (first[0] < second[1] and second[0] < first[1]):
        return f"the runs did not overlap: {answers}"
    return extra(answers)


def main() -> int:
    path = sys.argv[1]
    failed = 0
    for name in CASES:
        problem = check(path, name)
        failed += bool(problem)
        print(f"{name}: {'FAIL ' + problem if problem else 'ok'}", flush=True)
    alive = run(path, "print(6 * 7)", 10)
    if "42" not in str(alive.get("stdout")):
        print(f"daemon after the cases: {alive}")
        failed += 1
    print(f"{len(CASES) - failed} of {len(CASES)} cross-run cases closed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
