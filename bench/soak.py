"""`python -m bench --soak SECONDS`: a private daemon at twice its capacity, with
hostile clients and faults, for SECONDS; every request's outcome is counted.

- Good clients (2 x [limits] max_workers), one connection per request, each
  `print(N)`: the answer is `ok` with stdout N, a typed error (`overloaded`...),
  or another status (a worker killed under it: `killed`); `wrong` is an ok with
  other output. `silent`: the connection closed without an answer; `lost`: no
  answer within the client timeout. A soak passes with 0 wrong, 0 silent, 0 lost.
- Hostile clients, each in a loop: a malformed line (its answer must be an error),
  a run that spins past its timeout, an output flood, and a client that sends
  requests with big outputs and never reads them (then hangs up).
- Faults on a schedule: kill -9 of a random worker (a process with one of the
  daemon's uids) every --soak-kill-every s, of the zygote every --soak-zygote-every s.
- The daemon's own RSS is sampled every --soak-sample-every s.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio

from bench import daemon as daemons
from bench.client import Answer
from bench.science import zygote_and_template

GOOD_CODE = "print({n})"
SPIN = {"language": "python3", "code": "while True: pass", "timeout": 0.5}
FLOOD = {"language": "python3", "code": "import sys\nsys.stdout.write('x' * 50_000_000)"}
MALFORMED = b'{"language": "python3", "code": \n'
NEVER_READ_REQUESTS = 20
NEVER_READ_HOLD = 5.0
CLIENT_TIMEOUT = 60.0
# Hostile clients pause between requests: a mix with the good ones, not a busy loop.
HOSTILE_PAUSE = 0.05
_decoder = msgspec.json.Decoder(Answer)


@dataclass
class Tally:
    """Outcomes by name: "ok", "wrong", "silent", "lost", "error:<code>", "status:<s>"."""

    outcomes: Counter[str] = field(default_factory=Counter)

    def record(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    @property
    def answered(self) -> int:
        return self.sent - self.outcomes["silent"] - self.outcomes["lost"]

    def summary(self) -> str:
        others = ", ".join(
            f"{name} {count}"
            for name, count in sorted(self.outcomes.items())
            if name not in ("ok", "error:overloaded", "wrong", "silent", "lost")
        )
        return (
            f"sent {self.sent}, answered {self.answered}, ok {self.outcomes['ok']}, "
            f"overloaded {self.outcomes['error:overloaded']}, wrong {self.outcomes['wrong']}, "
            f"silent {self.outcomes['silent']}, lost {self.outcomes['lost']}"
            + (f"; others: {others}" if others else "")
        )


def classify(answer: Answer | None, expected_stdout: str | None, failure: str = "silent") -> str:
    """One request's outcome; `failure` ("silent" or "lost") when there is no answer."""
    if answer is None:
        return failure
    if answer.error is not None:
        return f"error:{answer.error.code}"
    if answer.status == "ok":
        if expected_stdout is not None and answer.stdout != expected_stdout:
            return "wrong"
        return "ok"
    return f"status:{answer.status}"


async def exchange(socket_path: str, line: bytes) -> tuple[Answer | None, str]:
    """Send one line on a fresh connection; its answer, or None and why there is none."""
    with trio.move_on_after(CLIENT_TIMEOUT):
        try:
            stream = await trio.open_unix_socket(socket_path)
        except OSError:
            return None, "silent"  # refused: the daemon is not listening
        async with stream:
            try:
                await stream.send_all(line)
                data = b""
                while b"\n" not in data:
                    chunk = await stream.receive_some(1 << 20)
                    if not chunk:
                        return None, "silent"
                    data += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None, "silent"
        return _decoder.decode(data.split(b"\n", 1)[0]), ""
    return None, "lost"


@dataclass
class Soak:
    socket: str
    daemon_pid: int
    uid_min: int
    uid_max: int
    good: Tally = field(default_factory=Tally)
    hostile: dict[str, Tally] = field(default_factory=dict)
    kills: Counter[str] = field(default_factory=Counter)
    rss: list[tuple[float, int | None]] = field(default_factory=list)
    # The daemon's ERROR log lines, numbers blanked out, by count.
    log_errors: Counter[str] = field(default_factory=Counter)

    async def good_client(self, seed: int) -> None:
        chooser = random.Random(seed)
        while True:
            number = chooser.randrange(10**9)
            line = json.dumps({"language": "python3", "code": GOOD_CODE.format(n=number)})
            answer, failure = await exchange(self.socket, line.encode() + b"\n")
            self.good.record(classify(answer, f"{number}\n", failure or "silent"))

    async def hostile_client(self, kind: str, line: bytes) -> None:
        tally = self.hostile.setdefault(kind, Tally())
        while True:
            answer, failure = await exchange(self.socket, line)
            tally.record(classify(answer, None, failure or "silent"))
            await trio.sleep(HOSTILE_PAUSE)

    async def never_reader(self) -> None:
        tally = self.hostile.setdefault("never reads", Tally())
        request = json.dumps({"language": "python3", "code": "print('y' * 1_000_000)"})
        while True:
            try:
                stream = await trio.open_unix_socket(self.socket)
            except OSError:
                tally.record("silent")
                await trio.sleep(1)
                continue
            async with stream:
                with trio.move_on_after(NEVER_READ_HOLD):
                    try:
                        for _ in range(NEVER_READ_REQUESTS):
                            await stream.send_all(request.encode() + b"\n")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    await trio.sleep_forever()
            tally.record("hung up")

    def _workers(self) -> list[int]:
        found = []
        for name in os.listdir("/proc"):
            try:
                uid = os.stat(f"/proc/{name}").st_uid if name.isdigit() else -1
            except FileNotFoundError:
                continue
            if self.uid_min <= uid <= self.uid_max:
                found.append(int(name))
        return found

    def _zygotes(self) -> list[int]:
        zygote, _ = zygote_and_template(self.daemon_pid)
        return [zygote] if zygote is not None else []

    def _kill(self, kind: str, pids: list[int], chooser: random.Random) -> None:
        if not pids:
            return
        try:
            os.kill(chooser.choice(pids), signal.SIGKILL)
            self.kills[kind] += 1
        except ProcessLookupError:
            pass

    async def faults(self, kill_every: float, zygote_every: float) -> None:
        chooser = random.Random(7)
        elapsed = 0.0
        next_zygote = zygote_every
        while True:
            await trio.sleep(kill_every)
            elapsed += kill_every
            self._kill("worker", self._workers(), chooser)
            if zygote_every and elapsed >= next_zygote:
                next_zygote += zygote_every
                self._kill("zygote", self._zygotes(), chooser)

    async def sample_rss(self, every: float) -> None:
        started = trio.current_time()
        while True:
            rss = daemons.rss_kib(self.daemon_pid)
            self.rss.append((trio.current_time() - started, rss))
            print(
                f"[{trio.current_time() - started:6.0f}s] daemon RSS "
                f"{'-' if rss is None else f'{rss / 1024:.1f} MiB'}; good: {self.good.summary()}",
                file=sys.stderr,
                flush=True,
            )
            await trio.sleep(every)

    def report(self, seconds: float) -> str:
        lines = [f"soak of {seconds:g} s against pid {self.daemon_pid}"]
        lines.append(f"good clients: {self.good.summary()}")
        for kind, tally in sorted(self.hostile.items()):
            lines.append(f"hostile ({kind}): {tally.summary()}")
        lines.append(
            f"faults: {self.kills['worker']} workers and {self.kills['zygote']} zygotes killed"
        )
        known = [rss for _, rss in self.rss if rss is not None]
        if known:
            lines.append(
                f"daemon RSS: first {known[0] / 1024:.1f} MiB, max {max(known) / 1024:.1f} MiB, "
                f"last {known[-1] / 1024:.1f} MiB ({len(known)} samples)"
            )
        lines.append(f"daemon log: {sum(self.log_errors.values())} error lines")
        for kind, count in self.log_errors.most_common(8):
            lines.append(f"  {count:6d} x {kind[:150]}")
        return "\n".join(lines)

    def passed(self) -> bool:
        failures = ("wrong", "silent", "lost")
        malformed = self.hostile.get("malformed line", Tally())
        return all(self.good.outcomes[name] == 0 for name in failures) and all(
            name.startswith("error:") for name in malformed.outcomes
        )


@dataclass(frozen=True)
class SoakPlan:
    seconds: float
    max_workers: int = 4
    kill_every: float = 2.0
    zygote_every: float = 30.0
    sample_every: float = 30.0
    uid_min: int = 4_500_000
    uid_count: int = 2000
    state_dir: str | None = None


def error_kinds(log: Path) -> Counter[str]:
    """ERROR lines of a daemon log, with numbers blanked so that alike lines count together."""
    kinds: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        if " ERROR " in line:
            kinds[re.sub(r"[0-9]+", "N", line.split(" ERROR ", 1)[1])] += 1
    return kinds


async def soak(plan: SoakPlan) -> Soak:
    """Start a private daemon, soak it for plan.seconds, stop it; the tallies."""
    with tempfile.TemporaryDirectory(prefix="sandboxd-soak-") as temp:
        base = Path(temp) / "base.toml"
        uid_max = plan.uid_min + plan.uid_count - 1
        base.write_text(
            f"[limits]\nmax_workers = {plan.max_workers}\n"
            f"[jail]\nuid_min = {plan.uid_min}\nuid_max = {uid_max}\n"
        )
        socket_path = f"{temp}/sandboxd.sock"
        config = Path(temp) / "sandboxd.toml"
        runtime = Path(temp) / "run"
        runtime.mkdir()
        daemons.write_config(base, socket_path, str(runtime), config)
        command = daemons.daemon_command(config, socket_path, plan.state_dir)
        async with daemons.started(
            command, socket_path, Path(temp) / "daemon.log", 60.0, stop_timeout=15.0
        ) as daemon:
            assert daemon.process is not None
            run = Soak(socket_path, daemon.process.pid, plan.uid_min, uid_max)
            async with trio.open_nursery() as nursery:
                for number in range(2 * plan.max_workers):
                    nursery.start_soon(run.good_client, number)
                nursery.start_soon(run.hostile_client, "malformed line", MALFORMED)
                for kind, body in (("spins past its timeout", SPIN), ("output flood", FLOOD)):
                    nursery.start_soon(run.hostile_client, kind, json.dumps(body).encode() + b"\n")
                nursery.start_soon(run.never_reader)
                nursery.start_soon(run.faults, plan.kill_every, plan.zygote_every)
                nursery.start_soon(run.sample_rss, plan.sample_every)
                await trio.sleep(plan.seconds)
                nursery.cancel_scope.cancel()
            run.rss.append((plan.seconds, daemons.rss_kib(run.daemon_pid)))
            run.log_errors = error_kinds(Path(temp) / "daemon.log")
            if daemon.process.returncode is not None:
                raise daemons.DaemonFailed(
                    f"the daemon died during the soak:\n{daemons.log_tail(daemon.log)}"
                )
    return run
