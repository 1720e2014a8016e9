"""Hints that work, and messages that say what was looked for."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from textpoke import SymbolNotFound
from textpoke.sites import SiteKind, scan_process, scan_sites
from textpoke.sites.explain import nothing_found, what
from textpoke.sites.discover import Query

from .conftest import debian_binary


@pytest.fixture(scope="module")
def pie_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=False, pie=True)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "textpoke", "sites", *args], capture_output=True, text=True,
                          timeout=120)


def _hinted_command(stderr: str) -> list[str]:
    hint = next(line for line in stderr.splitlines() if line.startswith("textpoke: hint: "))
    return shlex.split(hint.split("`")[1])


def test_lib_with_a_file_suggests_a_command_that_works(pie_demo: Path) -> None:
    done = _run(str(pie_demo), "--lib", "libc.so", "--kind", "call", "--calls-to", "malloc")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == "textpoke: error: --lib selects a library mapped in a process; it needs a pid"
    command = _hinted_command(done.stderr)
    assert command[:2] == ["textpoke", "sites"] and command[2].endswith("libc.so.6")
    assert command[3:] == ["--kind", "call", "--calls-to", "malloc"]
    rerun = _run(*command[2:])
    assert rerun.returncode == 0 and "malloc" in rerun.stdout


def test_a_typo_gets_the_close_names(pie_demo: Path) -> None:
    done = _run(str(pie_demo), "-f", "midle")
    assert done.returncode == 12
    assert done.stderr.splitlines() == [
        f"textpoke: error: no function of {pie_demo} matches 'midle'",
        "textpoke: hint: did you mean 'middle'?",
    ]


def test_no_glob_given_is_never_called_a_glob(pie_demo: Path) -> None:
    """A binary without fentry sites, asked for fentry sites with no -f: say what was looked for."""
    done = _run(str(pie_demo), "--kind", "fentry")
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["0 sites: 0 fentry, 0 call in 0 functions"]
    assert "glob" not in done.stderr and "matched" not in done.stderr
    assert done.stderr.splitlines()[0] == (
        f"textpoke: note: no fentry sites in {pie_demo}: it was not built with -pg -mfentry (no __mcount_loc "
        "section, and no function starts with nop5 or call __fentry__)")
    assert "--calls-to" in done.stderr.splitlines()[1]


def test_calls_to_a_name_nobody_has(pie_demo: Path) -> None:
    done = _run(str(pie_demo), "--calls-to", "no_such_function")
    assert done.returncode == 0
    assert done.stderr.splitlines()[0] == (
        f"textpoke: note: no call sites to 'no_such_function' in {pie_demo}: it neither defines nor imports "
        "'no_such_function'")


def test_what_was_looked_for() -> None:
    assert what(Query(kinds=frozenset({SiteKind.FENTRY}))) == "fentry sites"
    assert what(Query(kinds=frozenset({SiteKind.FENTRY}), functions=("work*",))) == \
        "fentry sites in functions matching 'work*'"
    assert what(Query(kinds=frozenset({SiteKind.CALL}), calls_to=("malloc", "free"))) == \
        "call sites to 'malloc', 'free'"


def test_functions_that_match_without_fentry_sites(pie_demo: Path) -> None:
    scan = scan_sites(pie_demo, kinds={SiteKind.FENTRY}, functions=["mid*"])
    error = nothing_found(scan, sites_command="textpoke sites X", library_option=False)
    assert "no __mcount_loc" in error.message or "none has an fentry site" in error.message


def test_a_process_gets_a_lib_hint_that_works() -> None:
    jq = debian_binary("/usr/bin/jq", "jq")
    proc = subprocess.Popen([str(jq), "."], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 10
        while "libjq" not in Path(f"/proc/{proc.pid}/maps").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        scan = scan_process(proc.pid, kinds={SiteKind.CALL}, calls_to=["malloc"]).scan
        assert not scan.sites
        error = nothing_found(scan, sites_command=f"textpoke sites {proc.pid}", library_option=True)
        assert isinstance(error, SymbolNotFound)
        assert error.hint is not None
        command = shlex.split(error.hint.split("`")[1])
        assert command[:5] == ["textpoke", "sites", str(proc.pid), "--lib", "libjq.so.1"]
        rerun = _run(*command[2:], "--json")
        assert rerun.returncode == 0 and len(json.loads(rerun.stdout)) >= 1
    finally:
        proc.kill()
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()


def test_a_command_with_lib_is_told_to_add_it() -> None:
    """record/trace take --lib: the hint says to add it, and names a listing that works without a pid."""
    jq = debian_binary("/usr/bin/jq", "jq")
    scan = scan_sites(jq, kinds={SiteKind.CALL}, calls_to=["malloc"])
    error = nothing_found(scan, library_option=True)
    assert error.message == f"no call sites to 'malloc' in {jq}: it neither defines nor imports 'malloc'"
    assert error.hint is not None and error.hint.startswith("libjq.so.1 calls it: add --lib libjq.so.1 (`")
    listing = shlex.split(error.hint.split("`")[1])
    rerun = _run(*listing[2:], "--json")
    assert rerun.returncode == 0 and len(json.loads(rerun.stdout)) >= 1
