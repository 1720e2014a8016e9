"""Call-site tracing: exact counts per site, callees that see exactly what they would have."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from textpoke.capture import CaptureOptions
from textpoke.sites import SiteKind, sites_in_process
from textpoke.target import _ptrace
from textpoke.target.process import Process
from textpoke.x86.insn import CALL_SIZE, INT3

from .conftest import Target, capturing, symbols_of, tids_of

N = 5_000
THREADS = 4
PYTHON = "/usr/bin/python3"
SYS_READ = 0


@pytest.mark.parametrize("mode", ["trace", "count"])
def test_call_sites_exact(target, exact_calls, mode):
    """g is called from three sites, N, 2N and 3N times per thread: exact per site."""
    with capturing(target.pid, CaptureOptions(calls_to=("g",), mode=mode)) as capture:
        answer = target.ask(f"sites {N}")
    recording = capture.recording
    syms = symbols_of(exact_calls)
    assert [(s.kind, s.function, s.target_name) for s in recording.sites] == [
        ("call", "caller_a", "g"), ("call", "caller_b", "g"), ("call", "caller_c", "g")]
    assert recording.per_site().tolist() == [THREADS * N, THREADS * 2 * N, THREADS * 3 * N]
    assert recording.lost == 0
    if mode == "trace":
        records = recording.records
        assert [s.target for s in recording.sites] == [syms["g"]] * 3
        sites = np.array([s.address for s in recording.sites], dtype=np.uint64)
        assert (records["caller"] == sites[records["site"]]).all()
        assert recording.symbolize(sites) == ["caller_a", "caller_b", "caller_c"]
        assert set(np.unique(records["tid"]).tolist()) == tids_of(answer)
        # arg0 is g's argument: caller_x(i) passes i along.
        for site, calls in enumerate((N, 2 * N, 3 * N)):
            mine = records[records["site"] == site]
            assert sorted(collections.Counter(mine["arg0"].tolist()).values()) == [THREADS] * calls


@pytest.mark.parametrize(
    "options",
    [
        CaptureOptions(calls_to=("check6", "check8", "vsum")),
        CaptureOptions(calls_to=("check6", "check8", "vsum"), mode="count"),
        # Entries only: check6 reads its own return address, which a hooked function finds
        # to be the trampoline (the README says so).
        CaptureOptions(functions=("check6", "check8", "vsum"), entry_only=True),
        CaptureOptions(functions=("check6", "check8", "vsum"), mode="count"),
    ],
    ids=["call-trace", "call-count", "entry-trace", "entry-count"],
)
def test_callee_sees_its_arguments(target, exact_calls, options):
    """6 and 8 integer arguments (two on the stack), a varargs call with doubles (al = 3):
    every callee checks what it got, the caller checks every result, and check6's
    return address is the one its call site pushed."""
    with capturing(target.pid, options) as capture:
        answer = target.ask(f"args {N}")
    assert answer["bad"] == "0"
    recording = capture.recording
    assert recording.per_site().tolist() == [THREADS * N] * 3
    syms = symbols_of(exact_calls)
    if options.calls_to:
        check6_site = next(s.address for s in recording.sites if s.target_name == "check6")
        assert int(answer["ret6"]) == check6_site + CALL_SIZE
    else:
        assert syms["args_caller"] < int(answer["ret6"]) < syms["args_caller"] + 0x200
    if options.mode == "trace":
        arg0 = {s.id: (s.target_name or s.function) for s in recording.sites}
        first = {name: set(recording.records["arg0"][recording.records["site"] == i].tolist())
                 for i, name in arg0.items()}
        assert first == {"check6": {1}, "check8": {11}, "vsum": {3}}


# ---------------------------------------------------------------------------
# A binary we did not build: every malloc@plt call site of /usr/bin/python3
# ---------------------------------------------------------------------------

SCRIPT = """
import sys
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
keep = []
for i in range(200):
    keep.append(int("7" * (2000 + i)))
    keep.append("".join(["ab"] * (600 + i)))
    keep.append(str(i) * (700 + i))
    keep.append(bytes(1000 + i))
    keep.append(bytearray(b"x" * (900 + i)))
    keep.append(dict.fromkeys(range(100 + i)).copy())
del keep
sys.stdout.write("done\\n"); sys.stdout.flush()
sys.stdin.readline()
"""


class PythonRun:
    """python3 running SCRIPT: blocked in read() before "go" and again after "done"."""

    def __init__(self, script: Path) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0"}
        self.target = Target([PYTHON, "-S", "-s", str(script)], env=env)
        self.process = Process(self.target.pid)
        self.done = threading.Event()
        self.wait_blocked()

    def wait_blocked(self) -> None:
        deadline = time.monotonic() + 10
        while self.process.thread_syscall(self.target.pid) != SYS_READ:
            assert time.monotonic() < deadline, "python did not block in read()"
            time.sleep(0.001)

    def go(self) -> None:
        """Run the window: "go" in, "done" out (set ``done`` from another thread)."""
        self.target.proc.stdin.write("go\n")
        self.target.proc.stdin.flush()

        def read() -> None:
            assert self.target.proc.stdout.readline() == "done\n"
            self.done.set()

        threading.Thread(target=read, daemon=True).start()

    def close(self) -> None:
        self.process.close()
        self.target.close()


def _wait(tid: int) -> int:
    _, status = _ptrace.wait_thread(tid)
    assert os.WIFSTOPPED(status), f"python ended: status {status:#x}"
    return status


def breakpoint_counts(run: PythonRun, sites: list[int]) -> collections.Counter[int]:
    """The oracle: int3 at every site (ptrace, one thread), counted and stepped over."""
    tid = run.target.pid
    assert run.process.threads() == [tid], "the oracle expects a single-threaded python"
    process = run.process
    _ptrace.seize(tid)
    _ptrace.interrupt(tid)
    _wait(tid)
    original = {site: process.read(site, 1) for site in sites}
    for site in sites:
        process.write(site, INT3)
    _ptrace.cont(tid)
    run.go()
    hits: collections.Counter[int] = collections.Counter()
    while True:
        waited, status = _ptrace.wait_thread(tid, nohang=True)
        if waited == 0:
            if run.done.is_set() and process.thread_syscall(tid) == SYS_READ:
                _ptrace.interrupt(tid)
                _wait(tid)
                break
            time.sleep(0.0002)
            continue
        assert os.WIFSTOPPED(status), f"python ended: status {status:#x}"
        sig = os.WSTOPSIG(status)
        if sig != signal.SIGTRAP or status >> 16:
            _ptrace.cont(tid, 0 if sig == signal.SIGTRAP else sig)
            continue
        regs = _ptrace.get_regs(tid)
        site = regs.rip - 1
        assert site in original, f"unexpected trap at {regs.rip:#x}"
        hits[site] += 1
        process.write(site, original[site])
        _ptrace.set_regs(tid, regs._replace(rip=site))
        _ptrace.singlestep(tid)
        _wait(tid)
        process.write(site, INT3)
        _ptrace.cont(tid)
    for site, byte in original.items():
        process.write(site, byte)
    _ptrace.detach(tid)
    return hits


@pytest.mark.skipif(not os.path.exists(PYTHON), reason=f"{PYTHON} is not installed")
def test_python_malloc_calls_against_breakpoints(tmp_path):
    """--calls-to malloc on an unmodified python3: the same count per call site as an
    int3-per-site ptrace counter over the same deterministic window."""
    script = tmp_path / "allocate.py"
    script.write_text(SCRIPT)
    oracle_run = PythonRun(script)
    try:
        sites = [s.address for s in sites_in_process(oracle_run.target.pid, kinds={SiteKind.CALL},
                                                     calls_to=["malloc"])]
        if not sites:
            pytest.skip(f"{PYTHON} has no call sites to malloc that textpoke can see")
        oracle = breakpoint_counts(oracle_run, sites)
    finally:
        oracle_run.close()

    results = {}
    for mode in ("count", "trace"):
        run = PythonRun(script)
        try:
            with capturing(run.target.pid, CaptureOptions(calls_to=("malloc",), mode=mode)) as capture:
                run.go()
                assert run.done.wait(30)
                run.wait_blocked()
        finally:
            run.close()
        recording = capture.recording
        assert recording.lost == 0
        per_site = recording.per_site()
        results[mode] = {s.address: int(per_site[s.id]) for s in recording.sites if per_site[s.id]}
        if mode == "trace":
            assert {s.target_name for s in recording.sites} == {"malloc@plt"}
            assert len(recording.symbolize([s.target for s in recording.sites])) == len(recording.sites)
    assert sum(oracle.values()) >= 800  # the script's 800 large allocations, at least
    assert results["count"] == dict(oracle)
    assert results["trace"] == dict(oracle)
