"""Unmodified, stripped Debian programs recorded with --calls-to, every count checked
against an independent oracle: a ptrace counter with an int3 at each of the same call
sites, over the same deterministic run (both without address randomization, so the
same addresses)."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


from textpoke.ring import Recording
from textpoke.target import _ptrace
from textpoke.target.process import Process
from textpoke.target.spawn import spawn
from textpoke.x86.insn import INT3

from sites.conftest import debian_binary

ADDR_NO_RANDOMIZE = 0x0040000


def no_aslr() -> None:
    """In the child before exec: this program and its children run without ASLR."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.personality(libc.personality(0xFFFFFFFF) | ADDR_NO_RANDOMIZE)


@contextlib.contextmanager
def children_without_aslr():
    """While the block runs, the programs this process starts run without ASLR."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    old = libc.personality(0xFFFFFFFF)
    libc.personality(old | ADDR_NO_RANDOMIZE)
    try:
        yield
    finally:
        libc.personality(old)


def record(tmp_path: Path, argv: list[str], *options: str) -> tuple[Recording, subprocess.CompletedProcess]:
    out = tmp_path / "run.tpk"
    result = subprocess.run([sys.executable, "-m", "textpoke", "record", *options, "-o", str(out), "--", *argv],
                            capture_output=True, text=True, timeout=300, preexec_fn=no_aslr)
    assert result.returncode == 0, result.stderr
    return Recording.load(out), result


def oracle(argv: list[str], sites: list[int]) -> tuple[collections.Counter, bytes]:
    """Run ``argv`` (single-threaded, no ASLR) with an int3 at every site, held at its
    entry point until they are all in place; count each hit, step over it, put it back."""
    with children_without_aslr():
        proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    pid = proc.pid
    hits: collections.Counter = collections.Counter()
    with Process(pid) as process:
        original = {site: process.read(site, 1) for site in sites}
        for site in sites:
            process.write(site, INT3)
        _ptrace.cont(pid)
        while True:
            _, status = _ptrace.wait_thread(pid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                break
            sig = os.WSTOPSIG(status)
            if sig != signal.SIGTRAP:
                _ptrace.cont(pid, sig)
                continue
            regs = _ptrace.get_regs(pid)
            site = regs.rip - 1
            assert site in original, f"a trap at {regs.rip:#x}, not at a site"
            hits[site] += 1
            process.write(site, original[site])
            _ptrace.set_regs(pid, regs._replace(rip=site))
            _ptrace.singlestep(pid)
            _ptrace.wait_thread(pid)
            process.write(site, INT3)
            _ptrace.cont(pid)
    output = proc.stdout.read()
    proc.wait()
    return hits, output


def check(recording: Recording, argv: list[str], stdout: str) -> int:
    per_site = recording.per_site()
    traced = {s.address: int(per_site[s.id]) for s in recording.sites}
    hits, output = oracle(argv, sorted(traced))
    assert output.decode() == stdout  # the same run
    assert {a: n for a, n in traced.items() if n} == dict(hits)
    assert recording.lost == 0
    return sum(hits.values())


def test_jq_calls_to_malloc(tmp_path):
    """Stripped jq: its malloc calls are in libjq (jq itself neither defines nor imports it)."""
    jq = debian_binary("/usr/bin/jq", "jq")
    data = tmp_path / "data.json"
    data.write_text('{"a": [1, 2, {"b": "x"}], "c": {"d": [true, null, 3.5]}, "e": "' + "y" * 300 + '"}\n')
    argv = [str(jq), "-c", ".a, .c, (.e | length), [.a[] | numbers | . * 2]", str(data)]
    recording, result = record(tmp_path, argv, "--calls-to", "malloc", "--lib", "libjq")
    assert recording.sites and all(s.target_name.startswith("malloc") for s in recording.sites)
    assert check(recording, argv, result.stdout) > 50


def test_sqlite3_every_call_site(tmp_path):
    """Stripped sqlite3 shell, --calls-to '*': every call site of the executable."""
    sqlite3 = debian_binary("/usr/bin/sqlite3", "sqlite3")
    script = ("create table t(a, b); insert into t values (1, 'x'), (2, 'y'), (3, 'z');"
              "select a, b from t order by a desc; select count(*) from t;")
    argv = [str(sqlite3), ":memory:", script]
    recording, result = record(tmp_path, argv, "--calls-to", "*")
    assert len(recording.sites) > 100
    assert check(recording, argv, result.stdout) > 20
