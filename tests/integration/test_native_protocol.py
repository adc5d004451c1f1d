"""The NDJSON protocol against a real daemon: typed errors, connection reuse, caps."""

from __future__ import annotations

import json
import socket

from tests.integration.conftest import Daemon


def _exchange(daemon: Daemon, payload: bytes, answers: int) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(daemon.socket_path)
        sock.sendall(payload)
        data = bytearray()
        while data.count(b"\n") < answers:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_malformed_line_gets_bad_request_and_connection_stays_usable(daemon: Daemon) -> None:
    first, second = _exchange(
        daemon, b'{"language": "python3", "code": \n{"language":"python3","code":"print(5)"}\n', 2
    )
    assert first["error"]["code"] == "bad_request"  # type: ignore[index]
    assert second["stdout"] == "5\n"


def test_schema_error_names_the_field(daemon: Daemon) -> None:
    (answer,) = _exchange(daemon, b'{"id": 9, "language": "python3", "code": 12}\n', 1)
    assert answer["id"] == 9
    assert answer["error"]["code"] == "bad_request"  # type: ignore[index]
    assert "$.code" in answer["error"]["message"]  # type: ignore[index]


def test_string_is_not_a_bool(daemon: Daemon) -> None:
    (answer,) = _exchange(
        daemon, b'{"language": "python3", "code": "1", "enable_network": "false"}\n', 1
    )
    assert "enable_network" in answer["error"]["message"]  # type: ignore[index]


def test_unknown_field_is_refused(daemon: Daemon) -> None:
    (answer,) = _exchange(daemon, b'{"language": "python3", "code": "1", "files2": 1}\n', 1)
    assert answer["error"]["code"] == "bad_request"  # type: ignore[index]
    assert "files2" in answer["error"]["message"]  # type: ignore[index]


def test_unsupported_language(daemon: Daemon) -> None:
    (answer,) = _exchange(daemon, b'{"id": 1, "language": "ruby", "code": "puts 1"}\n', 1)
    assert answer["error"]["code"] == "unsupported_language"  # type: ignore[index]


def test_line_over_the_cap_gets_too_large_and_a_close(daemon: Daemon) -> None:
    huge = b'{"language": "python3", "code": "' + b"#" * (17 * 1024 * 1024)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(daemon.socket_path)
        try:
            sock.sendall(huge)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may close before we finish sending
        data = bytearray()
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    assert json.loads(data.splitlines()[0])["error"]["code"] == "too_large"
    daemon.assert_healthy()
