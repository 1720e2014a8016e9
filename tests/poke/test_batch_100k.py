"""One batch of 100,000 sites on a real process: apply while a thread calls every site,
exact counts, revert while it calls them again, the original bytes back.

tests/targets/many_calls.c: one function of 100,000 consecutive `call tick`; each site
is sent to a counting trampoline of its own. Every call reaches tick or its counter,
exactly one: tick's count plus all counters is 100,000 per run of the function, and
runs made once the batch is in place land on every counter exactly once each.
(Measured on the shared 2-core machine: under a second, building the target included.)
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from textpoke.poke import attach
from textpoke.poke.bulk import PatchArray
from textpoke.poke.resident import find_regions
from textpoke.target import _ptrace
from textpoke.target.process import Process
from textpoke.trampolines.counter import Counters
from textpoke.trampolines.tracer import probe_thread_abi
from textpoke.x86.insn import CALL_SIZE, encode_calls

SITES = 100_000


class ManyCalls:
    def __init__(self, binary: str) -> None:
        self.proc = subprocess.Popen([binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline().split()
        assert ready[0] == "ready" and int(ready[2]) == SITES
        self.pid = self.proc.pid

    def ask(self, command: str) -> list[str]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert answer and answer[0] == "done", answer
        return answer[1:]

    def count(self) -> tuple[int, int]:
        tick, runs = self.ask("count")
        return int(tick), int(runs)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def many_calls(build_target):
    target = ManyCalls(str(build_target("many_calls", fentry=False)))
    yield target
    target.close()


def symbol(binary: str, name: str) -> int:
    out = subprocess.run(["nm", binary], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[0], 16) for line in out.splitlines() if line.split()[-1] == name)


def test_a_hundred_thousand_sites_in_one_batch(many_calls, build_target):
    binary = str(build_target("many_calls", fentry=False))
    first, tick = symbol(binary, "calls_all"), symbol(binary, "tick")
    sites = np.uint64(first) + np.arange(SITES, dtype=np.uint64) * np.uint64(CALL_SIZE)
    with Process(many_calls.pid) as process:
        original = process.read(first, SITES * CALL_SIZE + 1)
    with attach(many_calls.pid) as session:
        counters = Counters(session.resident, n=SITES, near=first)
        old = encode_calls(sites, np.full(SITES, tick, dtype=np.uint64))
        stubs = np.uint64(counters.entry(0)) + np.arange(SITES, dtype=np.uint64) * np.uint64(
            counters.entry(1) - counters.entry(0))
        batch = PatchArray.build(sites, old, encode_calls(sites, stubs))
        assert batch.old.tobytes() == original[:-1]  # the file's calls, as the function holds them

        many_calls.ask("spin")  # a thread runs every site throughout the batch
        result = session.apply(batch)
        many_calls.ask("stop")
        assert (len(result.patched), result.syncs, result.skipped) == (SITES, 3, ())
        ticks, runs = many_calls.count()
        counted = counters.counts()
        # Exact under concurrency: every call of every run went to tick or to its counter.
        assert ticks + int(counted.sum()) == SITES * runs
        # Once in place, every site calls its counter, once per run, and tick never.
        many_calls.ask("run 3")
        after = counters.counts()
        assert (after - counted == 3).all()
        assert many_calls.count() == (ticks, runs + 3)
        sample = np.arange(0, SITES, 997)
        assert [session.read_insn(int(s)) for s in sites[sample]] == [batch.new[i].tobytes() for i in sample]

        many_calls.ask("spin")
        reverted = session.revert()
        many_calls.ask("stop")
        assert (len(reverted.patched), reverted.syncs) == (SITES, 3)
        ticks, runs = many_calls.count()
        assert ticks + int(counters.counts().sum()) == SITES * runs
        frozen = counters.counts()
        many_calls.ask("run 2")
        assert (counters.counts() == frozen).all()  # tick gets every call again
        assert many_calls.count() == (ticks + 2 * SITES, runs + 2)
        with Process(many_calls.pid) as process:
            assert process.read(first, SITES * CALL_SIZE + 1) == original  # the original bytes back


def test_a_second_attach_stops_no_thread(many_calls, monkeypatch):
    """The first attach borrows one thread; a later one, and the thread-ABI check a
    capture makes, stop none (the check uses what the install recorded)."""
    seized: list[int] = []
    seize = _ptrace.seize

    def counting(tid: int, *, options: int = 0) -> None:
        seized.append(tid)
        seize(tid, options=options)

    monkeypatch.setattr(_ptrace, "seize", counting)
    with attach(many_calls.pid) as session:
        assert session.resident.created and len(seized) == 1
        installed = session.resident.agent_tid
    seized.clear()
    with attach(many_calls.pid) as session:
        assert not session.resident.created and session.resident.agent_tid == installed
        abi = probe_thread_abi(session.process, exclude=frozenset({session.resident.agent_tid}))
        assert session.recovery is not None and session.recovery.written == ()
    assert seized == []
    assert "recorded at install" in abi.note and abi.tid_offset is not None
    with Process(many_calls.pid) as process:
        assert len([r for r in find_regions(process) if r.owned]) == 1


def test_clean_mark_skips_the_survey_only_after_a_clean_end(many_calls, build_target):
    """A session that ends by reverting marks the region clean: the next attach has
    nothing to recover. One that goes away without reverting (as a killed tool does)
    leaves it unmarked: the next attach surveys and puts its sites back."""
    binary = str(build_target("many_calls", fentry=False))
    first, tick = symbol(binary, "calls_all"), symbol(binary, "tick")
    sites = np.uint64(first) + np.arange(1000, dtype=np.uint64) * np.uint64(CALL_SIZE)
    old = encode_calls(sites, np.full(len(sites), tick, dtype=np.uint64))
    with attach(many_calls.pid) as session:
        counters = Counters(session.resident, n=len(sites), near=first)
        targets = np.uint64(counters.entry(0)) + np.arange(len(sites), dtype=np.uint64) * np.uint64(16)
        session.apply(PatchArray.build(sites, old, encode_calls(sites, targets)))
        assert not session.resident.clean  # cleared before the batch changed anything
    session = attach(many_calls.pid)
    assert session.resident.clean and session.recovery.sites == len(sites) and session.recovery.written == ()
    session.apply(PatchArray.build(sites, old, encode_calls(sites, targets)))
    # Gone without reverting, as a killed tool: no close(), only the lock and the memory let go.
    session.resident.close()
    session.process.close()
    with attach(many_calls.pid) as session:
        assert session.recovery.written == tuple(sites.tolist())  # surveyed and put back
    with Process(many_calls.pid) as process:
        assert process.read(first, len(sites) * CALL_SIZE) == old.tobytes()
