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
import time

from textpoke.poke import Patch, Step, attach
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
