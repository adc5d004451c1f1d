"""dify-sandbox behaviour Dify's deployments rely on, replayed against a real daemon."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandboxd import deps
from tests.integration.conftest import Daemon, start_daemon, stop_daemon
from tests.integration.test_http_daemon import (
    dify_outcome,
    dify_run,
    extract_json_result,
    python3_template,
)

# Four strings of 375,000 characters: within Dify's checks (400,000 each, 30 per array).
PARTS = 4
PART_CHARS = 375_000


def test_a_one_and_a_half_megabyte_node_output_comes_back_whole(daemon: Daemon) -> None:
    code = python3_template(
        f"def main() -> dict:\n    return {{'parts': ['z' * {PART_CHARS}] * {PARTS}}}\n", {}
    )
    stdout = dify_outcome(dify_run(daemon, code))
    assert len(stdout.encode()) > 1_500_000
    assert extract_json_result(stdout) == {"parts": ["z" * PART_CHARS] * PARTS}
    daemon.assert_healthy()


# --- Dependency routes --------------------------------------------------------------------------

NODE_PROBE = "sandboxd-node-probe"


def _node_tarball(base: Path) -> Path:
    """An npm package tarball made here, so npm installs it without any registry."""
    manifest = json.dumps({"name": NODE_PROBE, "version": "1.2.3", "main": "index.js"}).encode()
    tarball = base / "probe.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name, data in (("package.json", manifest), ("index.js", b"module.exports = 7\n")):
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return tarball


@pytest.fixture(scope="module")
def no_requirements(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """No python requirements file at all; a node package.json with one local package."""
    base = tmp_path_factory.mktemp("no-requirements")
    package_json = base / "package.json"
    tarball = _node_tarball(base)
    dependencies = {NODE_PROBE: f"file:{tarball}"}
    package_json.write_text(json.dumps({"private": True, "dependencies": dependencies}))
    deps.sync_node(str(base / "state"), str(package_json))
    running = start_daemon(
        base,
        f'[deps]\npython_requirements = "{base}/missing.txt"\nnode_packages = "{package_json}"\n',
    )
    yield running
    stop_daemon(running)


def _dify_get(daemon: Daemon, route: str, language: str) -> httpx.Response:
    return httpx.get(
        daemon.http_url + route,
        params={"language": language},
        headers={"X-Api-Key": daemon.api_key},
        timeout=120,
    )


def test_refresh_without_a_requirements_file_answers_code_0(no_requirements: Daemon) -> None:
    # dify-sandbox answers refresh with success when there is nothing to install.
    response = _dify_get(no_requirements, "/v1/sandbox/dependencies/refresh", "python3")
    assert response.status_code == 200
    assert response.json() == {"code": 0, "message": "success", "data": {"dependencies": []}}
    update = httpx.post(
        no_requirements.http_url + "/v1/sandbox/dependencies/update",
        json={"language": "python3"},
        headers={"X-Api-Key": no_requirements.api_key},
        timeout=120,
    )
    assert update.json()["code"] == 0, update.text
    no_requirements.assert_healthy()


def test_node_dependencies_are_listed_where_dify_sandbox_says_400(no_requirements: Daemon) -> None:
    # dify-sandbox: -400 (python3 only). sandboxd lists node_modules, and runs can require it.
    response = _dify_get(no_requirements, "/v1/sandbox/dependencies", "nodejs")
    assert response.json() == {
        "code": 0,
        "message": "success",
        "data": {"dependencies": [{"name": NODE_PROBE, "version": "1.2.3"}]},
    }
    answer = no_requirements.run(f"console.log(require('{NODE_PROBE}') * 6)", "nodejs")
    assert answer["stdout"] == "42\n", answer


def test_a_form_encoded_run_body_gets_a_typed_400(no_requirements: Daemon) -> None:
    # gin would bind these form fields; sandboxd takes JSON only (README says so).
    response = httpx.post(
        no_requirements.http_url + "/v1/sandbox/run",
        content=b"language=python3&code=print(1)&enable_network=true",
        headers={
            "X-Api-Key": no_requirements.api_key,
            "Content-Type": "application/x-www-form-urlencoded",
        },
        timeout=60,
    )
    assert response.status_code == 400
    answer = response.json()
    assert answer["code"] == -400
    assert "JSON" in answer["message"]
    no_requirements.assert_healthy()
