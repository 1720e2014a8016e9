"""Threads that block SIGTRAP are served, not refused (poke/guard.py).

tests/targets/blockers.c runs threads that block every signal for good (one
spins through the site, others wait in epoll_wait, read and nanosleep and
call through it after each wake-up) beside threads that block nothing. An
int3 of ours met by a blocking thread would kill the process, so each batch
holds exactly those threads while its int3s are in place. Checked: exact
counts (a + b == made), no syscall of a held thread ever returned EINTR, and
every blocking thread was held in every batch.
"""

from __future__ import annotations

import re
import statistics
import time

import pytest

from textpoke import UnsafeTarget
from textpoke.poke import Patch, Step, attach
from textpoke.sites import SiteKind, find_sites
from textpoke.x86.insn import encode_call

from .harness import Target, env_count, fields, read_mem, symbols

#: Threads of blockers.c that block every signal: spinners + epoller, reader, sleeper.
WAITERS = 3


def _site(binary) -> tuple[int, bytes, bytes]:
    syms = symbols(binary)
    (site,) = [s.address for s in find_sites(binary, kinds={SiteKind.CALL}, functions=["site_caller"],
                                             calls_to=["A"])]
    return site, encode_call(site, syms["A"]), encode_call(site, syms["B"])


def _exact(result: dict[str, int]) -> None:
    assert result["bad"] == 0
    assert result["a"] + result["b"] == result["made"]
    assert result["eintr"] == 0  # no held thread saw its syscall interrupted


def test_sigtrap_blockers_are_held_through_a_batch_storm(build_target):
    binary = build_target("blockers")
    site, to_a, to_b = _site(binary)
    spinners, batches = 2, env_count("TEXTPOKE_BLOCKER_BATCHES", 200)
    target = Target([str(binary), "2", str(spinners)])
    armed: list[float] = []
    gaps: list[float] = []
    pokes = 0
    try:
        with attach(target.pid) as session:
            for i in range(batches):
                old, new = (to_a, to_b) if i % 2 == 0 else (to_b, to_a)
                session.apply([Patch(site=site, old=old, new=new)])
                armed.append(session.last_guard.armed_s)
                gaps.append(session.last_guard.look_gap_s)
                if i % 10 == 0:
                    assert target.ask("poke 3") == "poked"  # the waiters wake and call through the site
                    pokes += 3
            assert session.held_threads >= batches * (spinners + WAITERS)
            emulated = session.stats().emulated
        assert read_mem(target.pid, site, 5) == to_a
        result = fields(target.ask("stop"))
    finally:
        target.kill()
    _exact(result)
    assert result["epolled"] == result["read"] == pokes
    assert result["slept"] > 0 and result["b"] > 0 and emulated > 0
    print(f"{batches} batches, each holding the {spinners + WAITERS} threads that block every signal: "
          f"int3s in place {statistics.median(armed) * 1e3:.2f} ms median, {max(armed) * 1e3:.2f} ms max; "
          f"longest gap between looks for a thread that starts blocking SIGTRAP {max(gaps) * 1e3:.2f} ms; "
          f"calls {result['made']} (A {result['a']}, B {result['b']}), {emulated} emulated, EINTR 0")


def test_thread_that_starts_blocking_mid_batch_is_held_at_the_next_look(build_target):
    """A thread born blocking every signal after the batch's first look (it
    sleeps, then spins through the site): the look after the int3 sync holds it."""
    binary = build_target("blockers")
    site, to_a, to_b = _site(binary)
    target = Target([str(binary), "1", "0"])

    def start_late(step: Step) -> None:
        if step is Step.PUBLISHED:
            assert target.ask("late 200") == "late"  # blocks every signal, sleeps 200 ms, then spins

    try:
        with attach(target.pid) as session:
            session.apply([Patch(site=site, old=to_a, new=to_b)], on_step=start_late)
            assert session.late_held == 1
            time.sleep(0.3)  # the late thread now spins through call B
            session.apply([Patch(site=site, old=to_b, new=to_a)])
            assert session.last_guard.held_total == 1 + WAITERS
        result = fields(target.ask("stop"))
    finally:
        target.kill()
    _exact(result)
    assert result["b"] > 0


def test_blocking_thread_in_a_call_a_stop_would_end_with_eintr_is_refused(build_target):
    """A thread that blocks every signal and waits in mq_receive (which a ptrace
    stop ends with EINTR, visible to the program): it is not interrupted; after
    a second's wait the batch is refused with one line, nothing written."""
    binary = build_target("blockers")
    site, to_a, to_b = _site(binary)
    target = Target([str(binary), "1", "0"])
    try:
        assert target.ask("mq") == "mq"
        with attach(target.pid) as session:
            syncs = session.stats().syncs
            with pytest.raises(UnsafeTarget) as info:
                session.apply([Patch(site=site, old=to_a, new=to_b)])
            assert info.value.exit_code == 13
            assert re.fullmatch(rf"thread \d+ \(blockers-\w+\) of process {target.pid} blocks SIGTRAP and waits in "
                                r"syscall 243, which textpoke's hold would end with EINTR; nothing was written",
                                info.value.message)
            assert (session.stats().syncs, read_mem(target.pid, site, 5)) == (syncs, to_a)
        result = fields(target.ask("stop"))  # the mq thread is detached: main returns past it
    finally:
        target.kill()
    _exact(result)  # eintr=0: the mq thread was never interrupted
