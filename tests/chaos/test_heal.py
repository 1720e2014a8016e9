"""The target heals itself: a tool killed mid-batch leaves no int3 behind.

A tool SIGKILLed while its batch has int3s in place, with a thread that
blocks every signal held (and gated) by it: the agent notices through the
tool's pidfd, finishes the batch, and the gated thread goes on only then.
No recover, no attach: the program's throughput right after is measured
against its throughput before (printed, not asserted: a shared machine),
and its counts stay exact.
"""

from __future__ import annotations

import os
import select
import struct
import time

from textpoke.poke import Patch, Step, attach
from textpoke.poke.resident import DEFAULT_CAPACITY, WATCH_PIDFD, find_regions, generate_code, thread_pc
from textpoke.target import syscalls as sc
from textpoke.target.process import Process
from textpoke.x86.insn import INT3_BYTE

from .harness import Target, fields, fork_and_kill, read_mem
from .test_blockers import _exact, _site


def _rate(target: Target, seconds: float = 0.3) -> float:
    """Calls per second through the site, measured by the program's own counter."""
    first = fields(target.ask("count"))["made"]
    start = time.monotonic()
    time.sleep(seconds)
    last = fields(target.ask("count"))["made"]
    return (last - first) / (time.monotonic() - start)


def _tool(pid: int, site: int, old: bytes, new: bytes, step: Step, out: int) -> None:
    """Attach, apply old -> new and stop for good after ``step`` (reported on ``out``)."""
    try:
        session = attach(pid)

        def hold(done: Step) -> None:
            if done is step:
                os.write(out, f"{done.value} held={len(session.current_guard.held)}\n".encode())
                time.sleep(3600)

        session.apply([Patch(site=site, old=old, new=new)], on_step=hold)
    except BaseException as exc:
        os.write(out, f"error {type(exc).__name__}: {exc}\n".encode())
    finally:
        os._exit(0)


def _line(fd: int, timeout: float = 30.0) -> str:
    assert select.select([fd], [], [], timeout)[0], "the tool did not report"
    return os.read(fd, 4096).decode().strip()


def test_killed_mid_batch_the_target_heals_itself_at_full_speed(build_target):
    binary = build_target("blockers")
    site, to_a, to_b = _site(binary)
    target = Target([str(binary), "2", "1"])  # 2 workers, 1 thread spinning with every signal blocked
    try:
        with attach(target.pid):
            pass  # the resident part in place before the measurement
        before = _rate(target)
        rates = []
        for step in (Step.INT3, Step.TAIL):
            seen = fork_and_kill(lambda out: _tool(target.pid, site, to_a, to_b, step, out), _line, 0.05)
            assert seen.startswith(f"{step.value} held=4"), seen  # the spinner, epoller, reader, sleeper
            killed = time.monotonic()
            while read_mem(target.pid, site, 1)[0] == INT3_BYTE:
                assert time.monotonic() - killed < 5, "the agent did not finish the batch"
                time.sleep(0.0002)
            healed_ms = (time.monotonic() - killed) * 1e3
            assert read_mem(target.pid, site, 5) == to_b  # finished, not undone: the table's entry
            rates.append((step.value, healed_ms, _rate(target)))
            with attach(target.pid) as session:  # the next tool finds the text whole, told who finished it
                heal = session.recovery.agent_heal
                assert heal is not None and (heal.sites, heal.batches) == (1, 1)
                assert session.recovery.in_flight == ()
        result = fields(target.ask("stop"))
    finally:
        target.kill()
    _exact(result)
    shown = "; ".join(f"killed after {name}: no int3 {ms:.1f} ms after the kill was reaped, then {rate / 1e6:.1f}M "
                      f"calls/s" for name, ms, rate in rates)
    print(f"throughput before the kill {before / 1e6:.1f}M calls/s; {shown} (no recover run)")


def _blind_tool(pid: int, site: int, old: bytes, new: bytes, out: int) -> None:
    """Like _tool, but the agent loses sight of it (its pidfd closed, as a program that
    closes every descriptor would do) once the int3s are in place, then it stops for good."""
    try:
        session = attach(pid)

        def hold(done: Step) -> None:
            if done is Step.INT3:
                resident = session.resident
                resident.syscall(sc.SYS_close, struct.unpack_from("<I", resident.ctl, WATCH_PIDFD)[0])
                os.write(out, f"int3 held={len(session.current_guard.held)}\n".encode())
                time.sleep(3600)

        session.apply([Patch(site=site, old=old, new=new)], on_step=hold)
    except BaseException as exc:
        os.write(out, f"error {type(exc).__name__}: {exc}\n".encode())
    finally:
        os._exit(0)


def test_held_threads_wait_at_the_gate_until_the_batch_is_finished(build_target):
    """The tool dies while it holds a thread that spins through the site with
    every signal blocked, and the agent cannot tell (its pidfd was closed): the
    kernel releases the thread, which must wait at the gate (an int3 would kill
    the process) until the next attach takes the batch over and finishes it."""
    binary = build_target("blockers")
    site, to_a, to_b = _site(binary)
    target = Target([str(binary), "1", "1"])
    try:
        before = _rate(target)
        seen = fork_and_kill(lambda out: _blind_tool(target.pid, site, to_a, to_b, out), _line, 0.05)
        assert seen.startswith("int3 held=4"), seen
        time.sleep(0.2)
        assert read_mem(target.pid, site, 1)[0] == INT3_BYTE  # nobody finished it yet
        with Process(target.pid) as process:
            (region,) = [r for r in find_regions(process) if r.owned]
            gate = region.base + generate_code(capacity=DEFAULT_CAPACITY)[1]["gate"]
            waiting = [tid for tid in process.threads() if process.thread_syscall(tid) == sc.SYS_futex
                       and thread_pc(target.pid, tid) in range(gate, gate + 64)]
        assert len(waiting) == 4  # the spinner, epoller, reader and sleeper, alive, at the gate
        trapping = _rate(target)  # every call through the site traps into the resident handler
        with attach(target.pid) as session:  # takes the batch over after the agent's grace
            assert session.recovery.in_flight == (site,) and session.recovery.agent_heal is None, (
                session.resident.created, session.recovery)
        assert read_mem(target.pid, site, 5) == to_a
        after = _rate(target)
        result = fields(target.ask("stop"))
    finally:
        target.kill()
    _exact(result)
    print(f"a batch nobody could finish (the agent blind): {before / 1e6:.1f}M calls/s before, "
          f"{trapping / 1e6:.2f}M calls/s while its int3 stayed (one worker), {after / 1e6:.1f}M after the next attach")
