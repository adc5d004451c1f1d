"""The dify-sandbox HTTP API of a real daemon, as Dify's client uses it.

Dify's handling of an answer (spec, "What Dify does with the answer") is
re-implemented in ``dify_outcome`` so the templates Dify sends are checked end
to end: the answer must lead Dify to the node's real output.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Daemon, start_daemon, stop_daemon

# The small daemon: short timeouts, one worker slot and room for two requests.
SMALL_CONFIG = """
header_timeout = 1.0
[limits]
timeout = 2.0
max_workers = 1
max_requests = 2
[python3]
enable_preload = true
"""
HANG_GUARD = 60.0


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, python_deps_state: str) -> Iterator[Daemon]:
    # start_daemon writes the [http] section first, so SMALL_CONFIG's first key lands there.
    running = start_daemon(
        tmp_path_factory.mktemp("small"), SMALL_CONFIG, state_dir=python_deps_state
    )
    yield running
    stop_daemon(running)
    assert running.process.returncode == 0, running.log_path.read_text()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=daemon.http_url, headers={"X-Api-Key": daemon.api_key}, timeout=HANG_GUARD
    ) as session:
        yield session


def dify_run(
    daemon: Daemon, code: str, language: str = "python3", preload: str = ""
) -> httpx.Response:
    """The request Dify's code executor sends (it always asks for the network)."""
    body = {"language": language, "code": code, "preload": preload, "enable_network": True}
    return httpx.post(
        f"{daemon.http_url}/v1/sandbox/run",
        content=json.dumps(body),
        headers={"X-Api-Key": daemon.api_key, "Content-Type": "application/json"},
        timeout=HANG_GUARD,
    )


# --- Dify's side, re-implemented --------------------------------------------------------


class NodeFailed(Exception):
    """Dify would fail the code node with this message."""


def dify_outcome(response: httpx.Response) -> str:
    """What Dify's code executor makes of an answer: the stdout, or the node's failure."""
    if response.status_code == 503:
        raise NodeFailed("Code execution service is unavailable")
    if response.status_code != 200:
        raise NodeFailed(f"Failed to execute code, got status code {response.status_code}")
    try:
        answer = response.json()
    except ValueError as exc:
        raise NodeFailed("Failed to parse response") from exc
    if answer.get("code") != 0:
        raise NodeFailed(
            f"Got error code: {answer.get('code')}. Got error msg: {answer.get('message')}"
        )
    data = answer["data"]
    assert isinstance(data, dict), "Dify requires data to be an object"
    if data.get("error"):
        raise NodeFailed(data["error"])
    stdout = data.get("stdout") or ""
    assert isinstance(stdout, str)
    return stdout


def extract_result(stdout: str) -> str:
    match = re.search(r"<<RESULT>>(.*)<<RESULT>>", stdout, re.DOTALL)
    if match is None:
        raise NodeFailed("Failed to parse result")
    return match.group(1)


def extract_json_result(stdout: str) -> dict[str, Any]:
    result = json.loads(extract_result(stdout))
    if not isinstance(result, dict):
        raise NodeFailed("Result must be a dict")
    return result


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def python3_template(code: str, inputs: dict[str, Any]) -> str:
    """The shape of Dify's current python3 runner."""
    return (
        f"{code}\n\n"
        "import json\n"
        "from base64 import b64decode\n"
        f"inputs_obj = json.loads(b64decode('{b64(json.dumps(inputs))}').decode('utf-8'))\n"
        "output_obj = main(**inputs_obj)\n"
        "output_json = json.dumps(output_obj, indent=4)\n"
        "result = f'''<<RESULT>>{output_json}<<RESULT>>'''\n"
        "print(result)\n"
    )


def python3_older_template(code: str, inputs: dict[str, Any]) -> str:
    """The shape of older Dify's python3 runner."""
    return (
        f"{code}\n\n"
        "from json import loads, dumps\n"
        "from base64 import b64decode\n"
        f"inputs = b64decode('{b64(json.dumps(inputs))}').decode('utf-8')\n"
        "output = main(**loads(inputs))\n"
        "output = dumps(output, indent=4)\n"
        "result = f'''<<RESULT>>\n{output}\n<<RESULT>>'''\n"
        "print(result)\n"
    )


def jinja2_template(template: str, inputs: dict[str, Any]) -> str:
    """The shape of Dify's jinja2 runner (language python3)."""
    return (
        "import jinja2\n"
        "import json\n"
        "from base64 import b64decode\n"
        f"template = b64decode('{b64(template)}').decode('utf-8')\n"
        f"inputs = json.loads(b64decode('{b64(json.dumps(inputs))}').decode('utf-8'))\n"
        "output = jinja2.Template(template).render(**inputs)\n"
        "print(f'''<<RESULT>>{output}<<RESULT>>''')\n"
    )


JINJA2_PRELOAD = (
    "import jinja2\n"
    "def _jinja2_preload_():\n"
    "    jinja2.Template('{{s}}').render(s='a')\n"
    "if __name__ == '__main__':\n"
    "    _jinja2_preload_()\n"
)


def nodejs_template(code: str, inputs: dict[str, Any]) -> str:
    """The shape of Dify's javascript runner (language nodejs)."""
    return (
        f"{code}\n\n"
        f"var inputs_obj = JSON.parse(Buffer.from('{b64(json.dumps(inputs))}', 'base64')"
        ".toString('utf-8'))\n"
        "var output_obj = main(inputs_obj)\n"
        "var output_json = JSON.stringify(output_obj)\n"
        "var result = `<<RESULT>>${output_json}<<RESULT>>`\n"
        "console.log(result)\n"
    )


USER_PYTHON = (
    "def main(name: str, count: int) -> dict:\n"
    "    return {'greeting': f'héllo {name} 🌍', 'double': count * 2}\n"
)
INPUTS = {"name": "世界", "count": 21}
EXPECTED = {"greeting": "héllo 世界 🌍", "double": 42}


# --- the three templates, through Dify's handling -------------------------------------


def test_dify_python3_template_gives_dify_the_result(daemon: Daemon) -> None:
    stdout = dify_outcome(dify_run(daemon, python3_template(USER_PYTHON, INPUTS)))
    assert extract_json_result(stdout) == EXPECTED


def test_older_dify_python3_template_gives_dify_the_result(daemon: Daemon) -> None:
    stdout = dify_outcome(dify_run(daemon, python3_older_template(USER_PYTHON, INPUTS)))
    assert extract_json_result(stdout) == EXPECTED


def test_dify_jinja2_template_with_preload_gives_dify_the_text(small: Daemon) -> None:
    template = "Dear {{ name }},{% for i in range(count) %} {{ i }}{% endfor %}"
    code = jinja2_template(template, {"name": "Zoë", "count": 3})
    stdout = dify_outcome(dify_run(small, code, preload=JINJA2_PRELOAD))
    assert extract_result(stdout) == "Dear Zoë, 0 1 2"


@pytest.mark.nodejs
def test_dify_nodejs_template_gives_dify_the_result(daemon: Daemon) -> None:
    code = (
        "function main({name, count}) {\n"
        "  obj = {greeting: `héllo ${name} 🌍`, double: count * 2}\n"  # sloppy-mode global
        "  return obj\n"
        "}\n"
    )
    stdout = dify_outcome(dify_run(daemon, nodejs_template(code, INPUTS), language="nodejs"))
    assert extract_json_result(stdout) == EXPECTED


def test_a_user_exception_fails_the_node_with_the_traceback(daemon: Daemon) -> None:
    code = python3_template("def main() -> dict:\n    raise ValueError('bad input')\n", {})
    response = dify_run(daemon, code)
    data = response.json()["data"]
    assert data["exit_code"] == 1
    assert data["error"].startswith("process exited with code 1\nTraceback (most recent call last)")
    assert data["error"].endswith("ValueError: bad input\n")
    with pytest.raises(NodeFailed, match="ValueError: bad input"):
        dify_outcome(response)


# --- run envelopes ----------------------------------------------------------------------


def test_unicode_goes_in_and_comes_out(daemon: Daemon) -> None:
    answer = dify_run(daemon, "s = 'héllo, 世界 🌍'\nprint(s, len(s))").json()
    assert answer == {
        "code": 0,
        "message": "success",
        "data": {"stdout": "héllo, 世界 🌍 11\n", "stderr": "", "error": "", "exit_code": 0},
    }


def test_logging_to_stderr_with_exit_0_does_not_fail_the_node(daemon: Daemon) -> None:
    response = dify_run(daemon, "import logging\nlogging.warning('just saying')\nprint('done')")
    data = response.json()["data"]
    assert data["error"] == ""
    assert data["stderr"] == "WARNING:root:just saying\n"
    assert dify_outcome(response) == "done\n"


def test_a_timeout_is_the_dify_timeout_text(small: Daemon) -> None:
    data = dify_run(small, "print('started', flush=True)\nwhile True: pass").json()["data"]
    assert data["error"] == "process exited with code -1\nerror: timeout\n"
    assert data["exit_code"] == -1
    assert data["stdout"] == "started\n"


def test_a_blocked_syscall_says_operation_not_permitted(daemon: Daemon) -> None:
    response = dify_run(daemon, "import os\nos.setuid(0)")
    data = response.json()["data"]
    assert "operation not permitted" in data["error"]
    assert data["exit_code"] == -1
    daemon.assert_healthy()


def test_304487_bytes_of_output_come_back_whole(daemon: Daemon) -> None:
    data = dify_run(daemon, "print('y' * 304486)").json()["data"]
    assert data["stdout"] == "y" * 304486 + "\n"
    assert data["error"] == ""


def test_network_requests_run_without_network_by_default(daemon: Daemon) -> None:
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.1', 80), timeout=5)\n"
        "except OSError as exc:\n"
        "    print('no network:', exc.errno)\n"
    )
    stdout = dify_outcome(dify_run(daemon, code))
    assert stdout.startswith("no network:")


def test_preload_runs_right_before_the_code_when_enabled(small: Daemon) -> None:
    stdout = dify_outcome(dify_run(small, "print('code')", preload="print('preload')"))
    assert stdout == "preload\ncode\n"


def test_preload_is_ignored_when_not_enabled(daemon: Daemon) -> None:
    stdout = dify_outcome(dify_run(daemon, "print('code')", preload="print('preload')"))
    assert stdout == "code\n"


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key", "dify-sandbox"])
def test_a_bad_or_missing_key_is_401_with_an_empty_body(daemon: Daemon, key: str | None) -> None:
    headers = {} if key is None else {"X-Api-Key": key}
    for method, path in [
        ("POST", "/v1/sandbox/run"),
        ("GET", "/v1/sandbox/dependencies?language=python3"),
        ("GET", "/metrics"),
    ]:
        response = httpx.request(
            method,
            daemon.http_url + path,
            json={"language": "python3", "code": "print(1)"},
            headers=headers,
            timeout=HANG_GUARD,
        )
        assert (response.status_code, response.content) == (401, b""), path


def test_health_needs_no_key(daemon: Daemon) -> None:
    response = httpx.get(f"{daemon.http_url}/health", timeout=HANG_GUARD)
    assert (response.status_code, response.json()) == (200, "ok")


def test_an_unsupported_language_is_400(client: httpx.Client) -> None:
    response = client.post("/v1/sandbox/run", json={"language": "ruby", "code": "puts 1"})
    assert response.status_code == 400
    assert response.json() == {"code": -400, "message": "unsupported language", "data": None}


def test_a_wrong_type_is_400_naming_the_field(client: httpx.Client) -> None:
    response = client.post(
        "/v1/sandbox/run",
        json={"language": "python3", "code": "print(1)", "enable_network": "false"},
    )
    assert (response.status_code, response.json()["code"]) == (400, -400)
    assert "enable_network" in response.json()["message"]


def test_malformed_json_is_400(client: httpx.Client) -> None:
    response = client.post("/v1/sandbox/run", content=b'{"language": "python3", "code": "pri')
    assert (response.status_code, response.json()["code"]) == (400, -400)
    assert response.json()["message"].startswith("malformed JSON body")
    assert response.json()["data"] is None


def test_a_100_mb_body_is_413_and_the_daemon_is_fine(daemon: Daemon, client: httpx.Client) -> None:
    response = client.post("/v1/sandbox/run", content=b"x" * (100 * 1024 * 1024))
    assert response.status_code == 413
    assert response.json()["code"] == -413
    assert client.get("/health").status_code == 200
    daemon.assert_healthy()


def _gauge(daemon: Daemon, series: str) -> float:
    text = httpx.get(
        f"{daemon.http_url}/metrics", headers={"X-Api-Key": daemon.api_key}, timeout=HANG_GUARD
    ).text
    match = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


def _queue_depth(daemon: Daemon) -> int:
    return int(_gauge(daemon, "sandboxd_queue_depth"))


def test_past_max_requests_is_503_too_many_requests(small: Daemon) -> None:
    # Two slow runs fill the small daemon (one running, one queued) ...
    answers: list[httpx.Response] = []
    runners = [
        threading.Thread(target=lambda: answers.append(dify_run(small, "while True: pass")))
        for _ in range(2)
    ]
    for runner in runners:
        runner.start()
    # ... which /metrics shows as one queued run (polled: a condition, not a sleep).
    deadline = time.monotonic() + HANG_GUARD
    while _queue_depth(small) < 1:
        assert time.monotonic() < deadline, "the two runs were never admitted"
        time.sleep(0.01)
    response = dify_run(small, "print('one too many')")
    assert response.status_code == 503
    assert response.json() == {"code": -503, "message": "Too many requests", "data": None}
    assert response.headers["retry-after"] == "1"
    with pytest.raises(NodeFailed, match="unavailable"):
        dify_outcome(response)
    assert _gauge(small, "sandboxd_busy_slots") == _gauge(small, "sandboxd_slots") == 1
    assert _gauge(small, 'sandboxd_overload_refusals_total{reason="queue_full"}') == 1
    for runner in runners:
        runner.join()
    # The run that took too long says timeout; the queued one either got the worker late
    # and timed out too, or never got one and says so (which, depends on this host's pace).
    timeout = "process exited with code -1\nerror: timeout"
    queued = " (no worker became free within 2 s)"
    errors = sorted(answer.json()["data"]["error"] for answer in answers)
    assert errors[0] == timeout + "\n"
    assert errors[1] in (timeout + "\n", timeout + queued + "\n")


# --- connections ------------------------------------------------------------------------


def test_one_keep_alive_connection_carries_100_runs(daemon: Daemon) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", int(daemon.http_url.rsplit(":", 1)[1]))
    ends: set[tuple[str, int]] = set()
    try:
        for n in range(100):
            body = json.dumps({"language": "python3", "code": f"print({n})"})
            connection.request("POST", "/v1/sandbox/run", body, {"X-Api-Key": daemon.api_key})
            response = connection.getresponse()
            assert json.loads(response.read())["data"]["stdout"] == f"{n}\n"
            assert connection.sock is not None, "the daemon closed the connection"
            ends.add(connection.sock.getsockname())
    finally:
        connection.close()
    assert len(ends) == 1


def test_a_stalled_half_request_is_closed_while_others_are_served(small: Daemon) -> None:
    host, port = small.http_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=HANG_GUARD) as stalled:
        stalled.sendall(b"POST /v1/sandbox/run HTTP/1.1\r\nHost: sandbox\r\nContent-Le")
        assert dify_outcome(dify_run(small, "print('served')")) == "served\n"
        received = bytearray()
        while chunk := stalled.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 408 ")


def test_dependencies_are_listed_with_versions(client: httpx.Client) -> None:
    response = client.get("/v1/sandbox/dependencies", params={"language": "python3"})
    answer = response.json()
    assert (response.status_code, answer["code"], answer["message"]) == (200, 0, "success")
    for dependency in answer["data"]["dependencies"]:
        assert set(dependency) == {"name", "version"}
        assert dependency["name"] and dependency["version"]


def test_metrics_count_the_runs(daemon: Daemon, client: httpx.Client) -> None:
    dify_run(daemon, "print(1)")
    text = client.get("/metrics").text
    match = re.search(r'^sandboxd_runs_total\{language="python3",status="ok"\} (\d+)$', text, re.M)
    assert match is not None and int(match.group(1)) >= 1
    assert "sandboxd_ready_workers{" in text
