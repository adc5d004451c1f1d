"""What goes into a jail root: facts read from the host's binaries."""

from __future__ import annotations

from pathlib import Path

from sandboxd.jail import rootfs


def test_externalized_builtins_are_read_from_nodes_embedded_config(tmp_path: Path) -> None:
    lexer = tmp_path / "lexer.js"
    lexer.write_text("// cjs-module-lexer\n")
    binary = tmp_path / "node"
    binary.write_bytes(
        b"\x7fELF padding "
        + b'"NODE_SHARED_BUILTIN_CJS_MODULE_LEXER_LEXER_PATH='
        + str(lexer).encode()
        + b'",'
        + b'"NODE_SHARED_BUILTIN_UNDICI_UNDICI_PATH=/nonexistent/undici.js" tail'
    )
    assert rootfs.externalized_builtins(str(binary), []) == {str(lexer)}


def test_a_node_without_externalized_builtins_needs_none(tmp_path: Path) -> None:
    binary = tmp_path / "node"
    binary.write_bytes(b"\x7fELF no config here")
    assert rootfs.externalized_builtins(str(binary), []) == set()


def test_python_root_holds_the_stdlib_and_the_interpreters_libraries() -> None:
    entries = rootfs.python_entries()
    paths = {entry.path for entry in entries}
    assert any(e.kind == "dir" and e.path.endswith("/python3.11") for e in entries)
    assert any(p.endswith("/libc.so.6") for p in paths)
    assert not any(p.startswith(("/home", "/root", "/run", "/etc/ssl/private")) for p in paths)
    # Of the host's /etc only the public TLS trust store is visible.
    assert {p for p in paths if p.startswith("/etc")} <= {"/etc/ssl/certs", "/etc/ssl/openssl.cnf"}
