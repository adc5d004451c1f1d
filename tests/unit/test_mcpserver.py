"""The MCP server's pure parts: the request it sends and the text the model reads."""

from __future__ import annotations

import sys

import pytest
from mcp.types import ImageContent, TextContent

from sandboxd.artifacts import Artifact
from sandboxd.mcpserver import (
    Refused,
    decode_answer,
    main,
    native_request,
    result_content,
    result_text,
)
from sandboxd.protocol import ErrorReply, RunResult


def test_native_request_carries_only_the_fields_given() -> None:
    assert native_request("python3", "print(1)", None, None) == {
        "language": "python3",
        "code": "print(1)",
    }
    assert native_request("nodejs", "x", "in", 2.5) == {
        "language": "nodejs",
        "code": "x",
        "stdin": "in",
        "timeout": 2.5,
    }
    assert native_request("python3", "x", None, None, {"a.csv": "eA=="})["files"] == {
        "a.csv": "eA=="
    }


def test_result_text_puts_the_verdict_before_the_streams() -> None:
    result = RunResult(None, "killed", None, 9, "out", "err", True, 12.34, 1.0, None, "why")
    assert result_text(result) == (
        "status: killed\nsignal: 9\nmessage: why\n"
        "truncated: output exceeded the limit and was cut\nwall_ms: 12.3\n"
        "--- stdout ---\nout\n--- stderr ---\nerr"
    )


def test_figures_become_image_content_and_files_base64_texts() -> None:
    png = Artifact("figure-1.png", "image/png", "iVBORw0KGgo=")
    csv = Artifact("out.csv", "application/octet-stream", "YSxi")
    result = RunResult(
        None, "ok", 0, None, "", "", False, 1.0, 1.0, None, images=[png], files=[csv]
    )
    text, image, file = result_content(result)
    assert isinstance(text, TextContent) and text.text == result_text(result)
    assert isinstance(image, ImageContent)
    assert (image.data, image.mime_type) == ("iVBORw0KGgo=", "image/png")
    assert isinstance(file, TextContent)
    assert file.text == "--- file out.csv (application/octet-stream, base64) ---\nYSxi"


def test_decode_answer_tells_a_refusal_from_a_result() -> None:
    refusal = decode_answer(b'{"id":null,"error":{"code":"overloaded","message":"full"}}')
    assert isinstance(refusal, ErrorReply)
    assert refusal.error.code == "overloaded"
    result = decode_answer(
        b'{"id":1,"status":"ok","exit_code":0,"signal":null,"stdout":"1\\n","stderr":"",'
        b'"truncated":false,"wall_ms":1.0,"cpu_ms":1.0,"peak_memory_bytes":null}'
    )
    assert isinstance(result, RunResult)
    assert result.stdout == "1\n"


@pytest.mark.parametrize("line", [b"not json", b'{"status":"ok"}', b"[1,2]"])
def test_decode_answer_refuses_what_it_cannot_read(line: bytes) -> None:
    with pytest.raises(Refused, match="cannot read"):
        decode_answer(line)


def test_mcp_without_the_sdk_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mcp.server.mcpserver", None)  # import raises ImportError
    assert main("/nonexistent.sock") == 1
    assert "needs the MCP Python SDK" in capsys.readouterr().err
