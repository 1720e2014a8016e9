"""`textpoke selftest` on this machine: every check passes, with exact counts."""

from __future__ import annotations

import os

from textpoke.selftest import CALLS, Status, run_selftest

from .harness import run_cli

NAMES = ["C compiler", "crash-safe borrow", "ptrace permission", "/proc/PID/mem writes", "shared memory private",
         "membarrier SYNC_CORE", "int3 emulation", "signal chaining", "text restored", "target survived"]


def test_selftest_checks():
    checks = run_selftest()
    assert [(c.name, c.status) for c in checks] == [(name, Status.OK) for name in NAMES], [
        c for c in checks if c.status != Status.OK]
    emulation = next(c for c in checks if c.name == "int3 emulation")
    assert emulation.detail == (f"{4 * CALLS} calls made mid-patch, each trapped and emulated exactly once "
                                "(A->B and back)")
    assert next(c for c in checks if c.name == "crash-safe borrow").detail.startswith(
        "a thread left mid-injection returned through its restore frame (")
    assert next(c for c in checks if c.name == "signal chaining").detail == (
        "the target's own SIGTRAP handler ran 1 time; textpoke's handler passed 1 trap on to it")


def test_selftest_cli_prints_a_table_and_exits_zero():
    done = run_cli("selftest", env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == NAMES
    assert [row.split("│")[2].strip() for row in rows] == ["ok"] * len(NAMES)
    assert done.stdout.splitlines()[-1] == f"all {len(NAMES)} checks passed"


def test_selftest_fails_loudly_when_something_needed_is_missing(tmp_path):
    """No C compiler: the table says so and the exit status is non-zero."""
    env = {**os.environ, "COLUMNS": "200", "PATH": str(tmp_path), "CC": "no-such-cc",
           "XDG_CACHE_HOME": str(tmp_path)}
    done = run_cli("selftest", env=env)
    assert done.returncode == 1
    rows = [line for line in done.stdout.splitlines() if line.startswith("│")]
    assert [[cell.strip() for cell in row.split("│")[1:4]] for row in rows] == [
        ["C compiler", "FAIL", "no C compiler found to build the selftest target"]]
    assert done.stderr.splitlines() == [
        "textpoke: error: selftest: 1 of 1 checks failed: C compiler",
        "textpoke: hint: textpoke cannot patch processes safely on this machine until these work",
    ]


def test_selftest_with_the_cache_under_tmp(tmp_path, monkeypatch):
    """The target binary then lives in /tmp: the program's own files are not
    textpoke's mappings, and the shared-memory check looks only at textpoke's."""
    cache = tmp_path / "cache"
    assert str(cache).startswith("/tmp/")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    checks = run_selftest()
    assert str(cache) in next(c for c in checks if c.name == "C compiler").detail
    assert [(c.name, c.status) for c in checks] == [(name, Status.OK) for name in NAMES], [
        c for c in checks if c.status != Status.OK]
    shared = next(c for c in checks if c.name == "shared memory private")
    assert shared.detail == ("1 memfd, mode 0o600; 0 writable+executable mappings; "
                             "0 of textpoke's mappings with a file path")
