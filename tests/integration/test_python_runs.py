"""Python 3 runs through a real daemon: results, limits and verdicts."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from sandboxd.config import LimitsConfig
from tests.integration.conftest import Daemon


def test_hello_world(daemon: Daemon) -> None:
    answer = daemon.run("print('hello world')")
    assert answer["status"] == "ok"
    assert answer["exit_code"] == 0
    assert answer["stdout"] == "hello world\n"
    assert answer["stderr"] == ""
    assert answer["wall_ms"] > 0
    assert answer["truncated"] is False


def test_request_id_is_echoed(daemon: Daemon) -> None:
    assert daemon.run("pass", id="abc-1")["id"] == "abc-1"
    assert daemon.run("pass", id=42)["id"] == 42


def test_stdin_reaches_the_code(daemon: Daemon) -> None:
    answer = daemon.run("import sys; print(sys.stdin.read().upper())", stdin="some input")
    assert answer["stdout"] == "SOME INPUT\n"


def test_stdin_past_the_pipe_is_fed_while_the_output_drains(daemon: Daemon) -> None:
    # 1 MiB out and err before any stdin is read, then 1 MiB of stdin: both directions
    # are past a pipe's 64 KiB, so feeding stdin first, or draining only after it, stalls.
    code = (
        "import sys\n"
        "sys.stdout.write('o' * (1 << 20)); sys.stdout.flush()\n"
        "sys.stderr.write('e' * (1 << 20)); sys.stderr.flush()\n"
        "print(len(sys.stdin.read()))\n"
    )
    answer = daemon.run(code, stdin="i" * (1 << 20), timeout=20)
    assert answer["status"] == "ok", answer["message"]
    assert answer["stdout"] == "o" * (1 << 20) + f"{1 << 20}\n"
    assert answer["stderr"] == "e" * (1 << 20)


def test_code_that_never_reads_a_large_stdin_still_answers(daemon: Daemon) -> None:
    answer = daemon.run("print('done')", stdin="i" * (1 << 20))
    assert answer["status"] == "ok"
    assert answer["stdout"] == "done\n"


def test_unicode_in_and_out(daemon: Daemon) -> None:
    answer = daemon.run("s = 'héllo, 世界 🌍'; print(s); print(len(s))")
    assert answer["stdout"] == "héllo, 世界 🌍\n11\n"


def test_exception_gives_error_with_traceback(daemon: Daemon) -> None:
    answer = daemon.run("def f():\n    raise ValueError('boom')\nf()")
    assert answer["status"] == "error"
    assert answer["exit_code"] == 1
    assert "Traceback (most recent call last)" in answer["stderr"]
    assert "raise ValueError('boom')" in answer["stderr"]
    assert answer["stderr"].endswith("ValueError: boom\n")


def test_sys_exit_code(daemon: Daemon) -> None:
    answer = daemon.run("import sys; print('bye'); sys.exit(3)")
    assert answer["status"] == "error"
    assert answer["exit_code"] == 3
    assert answer["stdout"] == "bye\n"


def test_name_is_main(daemon: Daemon) -> None:
    answer = daemon.run("if __name__ == '__main__':\n    print('main')")
    assert answer["stdout"] == "main\n"


def test_dataclass_and_pickle_see_main_module(daemon: Daemon) -> None:
    code = (
        "import dataclasses, pickle\n"
        "@dataclasses.dataclass\nclass P:\n    x: 'int'\n"
        "print(pickle.loads(pickle.dumps(P(3))))"
    )
    assert daemon.run(code)["stdout"] == "P(x=3)\n"


def test_timeout_kills_the_run(daemon: Daemon) -> None:
    answer = daemon.run("print('start', flush=True)\nwhile True: pass", timeout=1)
    assert answer["status"] == "timeout"
    assert answer["stdout"] == "start\n"
    assert 900 <= answer["wall_ms"] < 5000


def test_sleeping_past_the_timeout(daemon: Daemon) -> None:
    answer = daemon.run("import time; time.sleep(30)", timeout=0.5)
    assert answer["status"] == "timeout"


def test_memory_bomb_gets_memory_verdict(daemon: Daemon) -> None:
    answer = daemon.run("a = []\nwhile True: a.append(' ' * 10**6)", memory_mb=64)
    assert answer["status"] == "memory", answer
    daemon.assert_healthy()


def test_fork_bomb_gets_tasks_verdict(daemon: Daemon) -> None:
    code = "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"
    answer = daemon.run(code, timeout=2)
    assert answer["status"] == "tasks", answer
    daemon.assert_healthy()


def test_output_flood_is_cut_at_the_cap(daemon: Daemon) -> None:
    answer = daemon.run("import sys\nwhile True: sys.stdout.write('x' * 65536)")
    assert answer["status"] == "output_limit"
    assert answer["truncated"] is True
    assert len(answer["stdout"]) == LimitsConfig().output_bytes
    daemon.assert_healthy()


def test_large_output_under_the_cap_comes_back_whole(daemon: Daemon) -> None:
    answer = daemon.run("print('y' * 304486)")
    assert answer["status"] == "ok"
    assert len(answer["stdout"]) == 304487
    assert answer["truncated"] is False


def test_threads_work(daemon: Daemon) -> None:
    code = (
        "import threading\nresults = []\n"
        "ts = [threading.Thread(target=lambda i=i: results.append(i * i)) for i in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\nprint(sorted(results))"
    )
    assert daemon.run(code)["stdout"] == "[0, 1, 4, 9, 16, 25, 36, 49]\n"


def test_non_daemon_thread_finishes_before_exit(daemon: Daemon) -> None:
    code = (
        "import threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('late'))).start()"
    )
    assert daemon.run(code)["stdout"] == "late\n"


def test_tmp_is_writable_and_gone_in_the_next_run(daemon: Daemon) -> None:
    first = daemon.run(
        "import os\nopen('/tmp/left.txt', 'w').write('x')\n"
        "print(os.getcwd(), sorted(os.listdir('.')))"
    )
    # /tmp/out, where a run leaves files it wants back, is there (empty) in every run.
    assert first["stdout"] == "/tmp ['left.txt', 'out']\n"
    second = daemon.run("import os; print(os.listdir('/tmp'), os.listdir('/tmp/out'))")
    assert second["stdout"] == "['out'] []\n"


def test_state_of_one_run_is_invisible_to_the_next(daemon: Daemon) -> None:
    daemon.run(
        "import builtins, sys, json\nbuiltins.LEAK = 1\njson.dumps = None\nsys.modules['leak'] = 1"
    )
    answer = daemon.run(
        "import builtins, sys, json\n"
        "print(hasattr(builtins, 'LEAK'), json.dumps is None, 'leak' in sys.modules)"
    )
    assert answer["stdout"] == "False False False\n"


def test_fifty_parallel_runs_are_all_correct(daemon: Daemon) -> None:
    def one(i: int) -> tuple[int, dict[str, object]]:
        return i, daemon.run(f"import time; time.sleep(0.01); print({i} * 2)", id=i)

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(one, range(50)))
    for i, answer in answers:
        assert answer["status"] == "ok", answer
        assert answer["id"] == i
        assert answer["stdout"] == f"{i * 2}\n"


def test_many_requests_in_flight_on_one_connection(daemon: Daemon) -> None:
    lines = b"".join(
        b'{"id": %d, "language": "python3", "code": "print(%d)"}\n' % (i, i) for i in range(20)
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(daemon.socket_path)
        sock.sendall(lines)
        sock.shutdown(socket.SHUT_WR)
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    import json

    answers = [json.loads(line) for line in data.splitlines()]
    assert sorted(a["id"] for a in answers) == list(range(20))
    assert all(a["stdout"] == f"{a['id']}\n" for a in answers)


def test_client_that_disconnects_mid_run_does_not_hurt_others(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(daemon.socket_path)
        sock.sendall(b'{"language": "python3", "code": "import time; time.sleep(1)"}\n')
    others: list[dict[str, object]] = []
    threads = [
        threading.Thread(target=lambda: others.append(daemon.run("print(7)"))) for _ in range(5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a["stdout"] for a in others] == ["7\n"] * 5
    daemon.assert_healthy()


def test_tls_trust_store_is_there_for_https_and_private_keys_are_not(daemon: Daemon) -> None:
    code = (
        "import os, ssl\n"
        "print(ssl.create_default_context().cert_store_stats()['x509_ca'] > 0)\n"
        "print(os.path.exists('/etc/ssl/private'))"
    )
    assert daemon.run(code)["stdout"] == "True\nFalse\n"
