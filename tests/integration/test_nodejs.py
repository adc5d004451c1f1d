"""Node.js runs through a real daemon: Dify's semantics, limits, verdicts and the jail.

Every test here needs /usr/bin/node; without it the daemon answers
unsupported_language and the tests fail (they never skip).
"""

from __future__ import annotations

import base64
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.conftest import Daemon

pytestmark = pytest.mark.nodejs

MIB = 1024 * 1024


def node(daemon: Daemon, code: str, **fields: Any) -> dict[str, Any]:
    answer = daemon.run(code, language="nodejs", **fields)
    assert "error" not in answer, answer  # a protocol error: node is not served
    return answer


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def dify_result(stdout: str) -> Any:
    """What Dify does with stdout: the JSON between the <<RESULT>> markers."""
    match = re.search(r"<<RESULT>>(.*)<<RESULT>>", stdout, re.DOTALL)
    assert match, stdout
    return json.loads(match.group(1))


USER_CODE = (
    "function main({name, count}) {\n"
    "  return {greeting: `héllo ${name} 🌍`, double: count * 2}\n"
    "}\n"
)
INPUTS = {"name": "世界", "count": 21}
EXPECTED = {"greeting": "héllo 世界 🌍", "double": 42}


# --- what Dify relies on ------------------------------------------------------------------


def test_hello_world(daemon: Daemon) -> None:
    answer = node(daemon, "console.log('hello world')")
    assert answer["status"] == "ok"
    assert answer["exit_code"] == 0
    assert answer["stdout"] == "hello world\n"
    assert answer["stderr"] == ""


def test_unicode_in_and_out(daemon: Daemon) -> None:
    code = "const s = 'héllo, 世界 🌍'; console.log(s); console.error([...s].length)"
    answer = node(daemon, code)
    assert answer["stdout"] == "héllo, 世界 🌍\n"
    assert answer["stderr"] == "11\n"


def test_stdin_reaches_process_stdin(daemon: Daemon) -> None:
    code = (
        "let text = '';\n"
        "process.stdin.setEncoding('utf8');\n"
        "process.stdin.on('data', (chunk) => { text += chunk; });\n"
        "process.stdin.on('end', () => console.log(text.toUpperCase()));\n"
    )
    assert node(daemon, code, stdin="some ïnput")["stdout"] == "SOME ÏNPUT\n"


def test_dify_current_template(daemon: Daemon) -> None:
    code = (
        f"{USER_CODE}\n"
        f"var inputs_obj = JSON.parse(Buffer.from('{b64(json.dumps(INPUTS))}', 'base64')"
        ".toString('utf-8'))\n"
        "var output_obj = main(inputs_obj)\n"
        "var output_json = JSON.stringify(output_obj)\n"
        "var result = `<<RESULT>>${output_json}<<RESULT>>`\n"
        "console.log(result)\n"
    )
    answer = node(daemon, code)
    assert answer["status"] == "ok", answer
    assert dify_result(answer["stdout"]) == EXPECTED


def test_dify_older_template_assigns_undeclared_globals(daemon: Daemon) -> None:
    code = (
        f"{USER_CODE}\n"
        f"inputs_obj = JSON.parse(Buffer.from('{b64(json.dumps(INPUTS))}', 'base64')"
        ".toString('utf-8'))\n"
        "output = main(inputs_obj)\n"
        "output = JSON.stringify(output)\n"
        "result = `<<RESULT>>${output}<<RESULT>>`\n"
        "console.log(result)\n"
    )
    answer = node(daemon, code)
    assert answer["status"] == "ok", answer
    assert dify_result(answer["stdout"]) == EXPECTED


def test_commonjs_main_module(daemon: Daemon) -> None:
    code = (
        "console.log(typeof require, typeof module, typeof exports, typeof Buffer,\n"
        "  require.main === module, __filename, __dirname, this === module.exports)\n"
    )
    assert node(daemon, code)["stdout"] == (
        "function object object function true /tmp/main.js /tmp true\n"
    )


def test_large_code_and_limits_reach_the_worker_intact(daemon: Daemon) -> None:
    # Over 64 KiB of code, multi-byte text and a memory limit above 255 MiB take the
    # job header's longest encodings.
    filler = "// " + "é" * 40000 + "\n"
    answer = node(daemon, filler * 2 + "console.log('big ok')", memory_mb=300, timeout=10.5)
    assert answer["status"] == "ok", answer
    assert answer["stdout"] == "big ok\n"


# --- CVE-2025-3466 class: user declarations cannot reach anything before the jail --------

# Top-level names that broke dify-sandbox's template, the bootstrap's own names, and
# a load-time attempt at a host secret that prints a marker only if it succeeds.
REDECLARING = """
var fs = require('fs');
var code = 'user code';
var Module, path, main, job, readJob, runModule, installStdio, warmUp, exitPromptly;
function parseInt() { return 42; }
function decodeMsgpack() { return 'mine'; }
try {
  fs.readFileSync('/etc/shadow');
  console.log('SHADOW-READ');
} catch (error) {
  console.log('shadow: ' + error.code);
}
console.log(code, parseInt('7'), decodeMsgpack(), process.getuid() !== 0);
"""


def test_redeclaring_any_name_runs_inside_the_jail(daemon: Daemon) -> None:
    answer = node(daemon, REDECLARING)
    assert answer["status"] == "ok", answer
    assert "SHADOW-READ" not in answer["stdout"]
    assert answer["stdout"] == "shadow: ENOENT\nuser code 42 mine true\n"


def test_user_code_cannot_reach_the_bootstrap(daemon: Daemon) -> None:
    code = (
        "console.log(typeof readJob, typeof decodeMsgpack, module.parent,\n"
        "  Object.keys(require.cache).filter((f) => f.includes('bootstrap')).length)\n"
    )
    assert node(daemon, code)["stdout"] == "undefined undefined null 0\n"


def test_globals_of_one_run_are_gone_in_the_next(daemon: Daemon) -> None:
    node(daemon, "globalThis.LEAK = 1; JSON.stringify = null; require('fs').writeFileSync('x', '')")
    code = "console.log(typeof LEAK, typeof JSON.stringify, require('fs').readdirSync('.'))"
    answer = node(daemon, code)
    assert answer["stdout"] == "undefined function []\n"


# --- exits, errors, the event loop --------------------------------------------------------


def test_uncaught_exception_gives_error_with_the_stack(daemon: Daemon) -> None:
    answer = node(daemon, "function f() {\n  throw new Error('boom')\n}\nf()")
    assert answer["status"] == "error"
    assert answer["exit_code"] == 1
    assert "/tmp/main.js:2" in answer["stderr"]
    assert "Error: boom\n    at f (/tmp/main.js:2:9)" in answer["stderr"]


def test_syntax_error_gives_error(daemon: Daemon) -> None:
    answer = node(daemon, "console.log('never'\n")
    assert answer["status"] == "error"
    assert answer["exit_code"] == 1
    assert "SyntaxError" in answer["stderr"]
    assert answer["stdout"] == ""


def test_unhandled_rejection_gives_error(daemon: Daemon) -> None:
    answer = node(daemon, "console.log('before')\nPromise.reject(new Error('rejected'))")
    assert answer["status"] == "error"
    assert answer["exit_code"] == 1
    assert answer["stdout"] == "before\n"
    assert "Error: rejected" in answer["stderr"]


def test_timers_and_promises_run_to_completion(daemon: Daemon) -> None:
    code = (
        "setTimeout(() => console.log('timer'), 200)\n"
        "new Promise((resolve) => setTimeout(resolve, 50)).then(() => console.log('promise'))\n"
        "Promise.resolve().then(() => console.log('microtask'))\n"
        "process.on('exit', (code) => console.log('exit', code))\n"
        "console.log('sync')\n"
    )
    answer = node(daemon, code)
    assert answer["status"] == "ok"
    assert answer["stdout"] == "sync\nmicrotask\npromise\ntimer\nexit 0\n"


def test_before_exit_may_schedule_more_work(daemon: Daemon) -> None:
    code = (
        "let rounds = 0\n"
        "process.on('beforeExit', () => {\n"
        "  if (rounds++ < 2) setTimeout(() => console.log(rounds), 1)\n"
        "})\n"
        "process.on('exit', () => console.log('done'))\n"
    )
    assert node(daemon, code)["stdout"] == "1\n2\ndone\n"


def test_process_exit_code(daemon: Daemon) -> None:
    answer = node(daemon, "console.log('bye'); process.exit(3); console.log('never')")
    assert answer["status"] == "error"
    assert answer["exit_code"] == 3
    assert answer["stdout"] == "bye\n"


def test_process_exit_code_property(daemon: Daemon) -> None:
    answer = node(daemon, "process.exitCode = 4; setTimeout(() => console.log('later'), 10)")
    assert answer["exit_code"] == 4
    assert answer["stdout"] == "later\n"


def test_large_output_then_process_exit_loses_nothing(daemon: Daemon) -> None:
    code = "console.log('y'.repeat(700000)); console.error('e'.repeat(200000)); process.exit(0)"
    answer = node(daemon, code)
    assert answer["status"] == "ok"
    assert answer["stdout"] == "y" * 700000 + "\n"
    assert answer["stderr"] == "e" * 200000 + "\n"


def test_process_stdout_write_takes_strings_buffers_and_callbacks(daemon: Daemon) -> None:
    code = (
        "process.stdout.write('a')\n"
        "process.stdout.write(Buffer.from('b'), () => process.stdout.write('c\\n'))\n"
        "console.log(process.stdout.isTTY, process.stdout.writable)\n"
    )
    assert node(daemon, code)["stdout"] == "abundefined true\nc\n"


# --- limits and verdicts ------------------------------------------------------------------


def test_timeout_kills_the_run(daemon: Daemon) -> None:
    answer = node(daemon, "console.log('start')\nwhile (true) {}", timeout=1)
    assert answer["status"] == "timeout"
    assert answer["stdout"] == "start\n"
    daemon.assert_healthy()


def test_pending_timer_past_the_timeout(daemon: Daemon) -> None:
    answer = node(daemon, "setTimeout(() => console.log('late'), 30000)", timeout=0.5)
    assert answer["status"] == "timeout"
    assert answer["stdout"] == ""


def test_heap_bomb_gets_memory_verdict(daemon: Daemon) -> None:
    code = "const a = []\nwhile (true) a.push(new Array(1e6).fill(1.5))"
    answer = node(daemon, code, memory_mb=64)
    assert answer["status"] == "memory", answer
    daemon.assert_healthy()


def test_buffer_bomb_gets_memory_verdict(daemon: Daemon) -> None:
    answer = node(daemon, "const a = []\nwhile (true) a.push(Buffer.alloc(1e7, 1))", memory_mb=64)
    assert answer["status"] == "memory", answer


def test_output_flood_is_cut_at_the_cap(daemon: Daemon) -> None:
    answer = node(daemon, "const s = 'x'.repeat(65536)\nwhile (true) process.stdout.write(s)")
    assert answer["status"] == "output_limit"
    assert answer["truncated"] is True
    assert len(answer["stdout"]) == 1 * MIB
    daemon.assert_healthy()


# --- what must fail cleanly ---------------------------------------------------------------


def test_child_process_fails_with_an_exception(daemon: Daemon) -> None:
    code = (
        "try {\n"
        "  console.log(require('child_process').execSync('id').toString())\n"
        "} catch (error) {\n"
        "  console.log('failed', error.code)\n"
        "}\n"
    )
    answer = node(daemon, code)
    assert answer["status"] == "ok", answer
    assert answer["stdout"] == "failed ENOENT\n"


def test_uncaught_child_process_failure_is_an_error_not_a_crash(daemon: Daemon) -> None:
    answer = node(daemon, "require('child_process').execSync('id')")
    assert answer["status"] == "error"
    assert "ENOENT" in answer["stderr"]
    daemon.assert_healthy()


def test_worker_thread_cannot_spawn_a_process_either(daemon: Daemon) -> None:
    code = (
        "const { Worker } = require('worker_threads')\n"
        "const source = `\n"
        "  const { parentPort } = require('worker_threads')\n"
        "  try { require('child_process').execSync('id') }\n"
        "  catch (error) { parentPort.postMessage('failed ' + error.code) }`\n"
        "new Worker(source, { eval: true }).on('message', (m) => console.log(m))\n"
    )
    answer = node(daemon, code)
    assert answer["status"] == "ok", answer
    assert answer["stdout"] == "failed ENOENT\n"


def test_network_is_off(daemon: Daemon) -> None:
    code = (
        "const report = (what) => (error) => console.log(what, error.code || error.cause.code)\n"
        "require('http').get('http://example.com/', () => console.log('HTTP-REACHED'))\n"
        "  .on('error', report('http'))\n"
        "require('net').connect(80, '1.1.1.1', () => console.log('NET-REACHED'))\n"
        "  .on('error', report('net'))\n"
    )
    answer = node(daemon, code)
    assert answer["status"] == "ok", answer
    assert sorted(answer["stdout"].splitlines()) == ["http EAI_AGAIN", "net ENETUNREACH"]


def test_host_files_are_not_visible(daemon: Daemon) -> None:
    code = (
        "const fs = require('fs')\n"
        "for (const path of ['/etc/shadow', '/root', '/home', '/proc/1/environ', '/run']) {\n"
        "  try { fs.readFileSync(path); console.log('READ', path) }\n"
        "  catch (error) { console.log(path, error.code) }\n"
        "}\n"
        "console.log(fs.readdirSync('/etc').join(' '))\n"
    )
    answer = node(daemon, code)
    assert answer["stdout"].splitlines() == [
        "/etc/shadow ENOENT", "/root ENOENT", "/home ENOENT", "/proc/1/environ ENOENT",
        "/run ENOENT", "group hostname hosts nsswitch.conf passwd ssl",
    ]


def test_environment_is_not_the_hosts(daemon: Daemon) -> None:
    answer = node(daemon, "console.log(JSON.stringify(process.env))")
    assert json.loads(answer["stdout"]) == {
        "PATH": "/usr/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "USER": "sandbox",
        "NODE_PATH": "/opt/sandboxd/node_modules",
    }


# --- many at once -------------------------------------------------------------------------


def test_fifty_parallel_runs_are_all_correct(daemon: Daemon) -> None:
    def one(i: int) -> tuple[int, dict[str, Any]]:
        code = f"setTimeout(() => console.log({i} * 2), 10)"
        return i, daemon.run(code, language="nodejs", id=i)

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(one, range(50)))
    for i, answer in answers:
        assert answer["status"] == "ok", answer
        assert answer["id"] == i
        assert answer["stdout"] == f"{i * 2}\n"
