"""A borrowed thread resumes as if never stopped, signals and syscalls included.

tests/targets/signals.c has two threads blocked in read(2): SIGUSR1's handler
lacks SA_RESTART (a SIGUSR1 ends the read with EINTR), SIGUSR2's has it (the
read goes on). A signal sent to the thread while textpoke holds it, before
one of the injected syscalls (textpoke sees it arrive and holds it) or at
the end (still pending when the thread is given back), must have exactly the
effect it has on the thread without textpoke, measured first. The borrowee
(tests/targets/borrowee.c) checks that a borrow of each kind of thread,
through several injected syscalls, changes no register and no syscall result.
"""

from __future__ import annotations

import signal
import time

import pytest

from textpoke.target import _ptrace
from textpoke.target import syscalls as sc
from textpoke.target.inject import BorrowedThread
from textpoke.target.process import Process

from .harness import Target, fields
from .test_kill_install import _check_unchanged, _ReadyTarget


@pytest.fixture
def signals_target(build_target):
    binary = build_target("signals", fentry=False)
    target = _ReadyTarget([str(binary)])
    yield target
    target.kill()


def _settled(target: Target, key: str, value: int) -> dict[str, int]:
    """The counts once ``key`` reached ``value`` and the thread is back in read."""
    deadline = time.monotonic() + 10
    while True:
        counts = fields(target.ask("check"))
        if counts[key] >= value or time.monotonic() > deadline:
            time.sleep(0.05)
            return fields(target.ask("check"))
        time.sleep(0.005)


def _in_read(pid: int, tid: int) -> bool:
    return open(f"/proc/{pid}/task/{tid}/syscall").read().split()[0] == str(sc.SYS_read)


CASES = [("norestart", signal.SIGUSR1, "h1", {"h1": 1, "e1": 1, "in1": 1, "h2": 0, "e2": 0, "in2": 0}),
         ("restart", signal.SIGUSR2, "h2", {"h1": 0, "e1": 0, "in1": 0, "h2": 1, "e2": 0, "in2": 0})]


@pytest.mark.parametrize("thread, sig, handled, effect", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("when", ["unborrowed", "before an injected syscall", "at the end"])
def test_a_signal_during_a_borrow_has_the_effect_it_has_without_textpoke(signals_target, thread, sig, handled,
                                                                         effect, when):
    target = signals_target
    tid = target.tids[thread]
    before = fields(target.ask("check"))
    process = Process(target.pid)
    if when == "unborrowed":
        _ptrace.tgkill(target.pid, tid, sig)
    else:
        with BorrowedThread(process, tid) as thread_:
            if when == "before an injected syscall":
                _ptrace.tgkill(target.pid, tid, sig)
            assert thread_.syscall(sc.SYS_getpid) == target.pid
            assert thread_.syscall(sc.SYS_gettid) == tid
            # Seen and held when it arrived before a syscall; still pending otherwise.
            assert thread_.held_signals == ((sig,) if when == "before an injected syscall" else ())
            if when == "at the end":
                _ptrace.tgkill(target.pid, tid, sig)
    after = _settled(target, handled, before[handled] + 1)
    assert {k: after[k] - before[k] for k in effect} == effect
    assert _in_read(target.pid, tid)


def test_borrowing_each_kind_of_thread_changes_nothing(build_target):
    binary = build_target("borrowee", fentry=False, extra=("-mavx2",))
    target = _ReadyTarget([str(binary)])
    try:
        process = Process(target.pid)
        for kind in ("spinner", "sleeper", "main"):
            with BorrowedThread(process, target.tids[kind]) as thread:
                page = thread.syscall(sc.SYS_mmap, 0, 4096, sc.PROT_READ, sc.MAP_PRIVATE | sc.MAP_ANONYMOUS, -1, 0)
                assert thread.syscall(sc.SYS_munmap, page, 4096) == 0
                assert thread.syscall(sc.SYS_gettid) == target.tids[kind]
            _check_unchanged(target, f"after borrowing the {kind} thread")
        target.send("stop")
        assert target.proc.wait(10) == 0
    finally:
        target.kill()
