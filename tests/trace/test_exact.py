"""Exact numbers of records on real processes: every call recorded (or counted lost) once."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from textpoke.poke import attach
from textpoke.capture import CaptureOptions, Overflow
from textpoke.ring import RecordKind, RingReader, SiteTable
from textpoke.ring import decode
from textpoke.ring.format import RAW_DTYPE, UNKNOWN_CPU, write_ring_header
from textpoke.sites import SiteKind, sites_in_process
from textpoke.trampolines.tracer import Mode, StubKind, TracedSite, Tracer, probe_thread_abi

from .conftest import Target, capturing, no_rseq_env, tids_of

N = 20_000
THREADS = 4


def test_every_call_recorded_once(target):
    """4 threads x N calls of f: an entry and an exit each, 8N records, 0 lost, from
    exactly those threads, each thread's alternating enter/exit in its own order."""
    with capturing(target.pid, CaptureOptions(functions=("f",))) as capture:
        answer = target.ask(f"calls {N}")
    recording = capture.recording
    assert recording.lost == 0
    assert len(recording.records) == 2 * THREADS * N
    assert [s.function for s in recording.sites] == ["f"]
    assert recording.metadata["rseq"] and recording.metadata["thread_ids"] == "kernel tid"
    records = recording.records
    assert set(np.unique(records["tid"]).tolist()) == tids_of(answer)
    assert (records["site"] == 0).all()
    # Per thread, in time order: enter f(i), exit with f(i) = i + 1, for i = 0..N-1.
    for tid in tids_of(answer):
        mine = records[records["tid"] == tid]
        assert len(mine) == 2 * N
        assert (mine["kind"][0::2] == RecordKind.ENTER).all() and (mine["kind"][1::2] == RecordKind.EXIT).all()
        assert (mine["arg0"][0::2] == np.arange(N)).all() and (mine["arg0"][1::2] == np.arange(N) + 1).all()
        assert (np.diff(mine["ts_ns"].astype(np.int64)) >= 0).all()
    with capturing(target.pid, CaptureOptions(functions=("f",), entry_only=True)) as capture:
        target.ask(f"calls {N}")
    entries = capture.recording.records
    assert len(entries) == THREADS * N and (entries["kind"] == RecordKind.CALL).all()
    # The caller word is the return address into worker(), the function calling f.
    assert set(recording.symbolize(np.unique(records["caller"]))) == {"worker"}
    assert recording.start_ns <= int(records["ts_ns"].min()) <= int(records["ts_ns"].max()) <= recording.end_ns


def test_tiny_ring_loses_nothing_threads_wait(target):
    """A ring of 64 records per buffer: the writers wait for the reader over and over,
    and every record arrives, in each thread's order."""
    with capturing(target.pid, CaptureOptions(functions=("f",), ring_records=64 * 3)) as capture:
        answer = target.ask(f"calls {N}")
    recording = capture.recording
    assert recording.lost == 0 and len(recording.records) == 2 * THREADS * N
    assert recording.metadata["overflow"] == "wait" and recording.metadata["writer_wakes"] > 0
    records = recording.records
    for tid in tids_of(answer):
        mine = records[records["tid"] == tid]
        assert (mine["arg0"][mine["kind"] == RecordKind.ENTER] == np.arange(N)).all()


def test_drop_mode_counts_every_loss(target):
    """--drop with a tiny ring: threads never wait; records + lost == 4N exactly."""
    options = CaptureOptions(functions=("f",), ring_records=64 * 3, overflow=Overflow.DROP)
    with capturing(target.pid, options) as capture:
        target.ask(f"calls {N}")
    recording = capture.recording
    assert recording.lost > 0
    assert len(recording.records) + recording.lost == 2 * THREADS * N  # an entry and an exit a call
    assert recording.metadata["lost_full"] == recording.lost and recording.metadata["writer_wakes"] == 0


def test_count_mode_exact(target):
    with capturing(target.pid, CaptureOptions(functions=("f", "g"), mode="count")) as capture:
        target.ask(f"calls {N}")
        target.ask(f"sites {N // 10}")
    recording = capture.recording
    assert len(recording.records) == 0 and recording.lost == 0
    counts = dict(zip((s.function for s in recording.sites), recording.counts.tolist()))
    assert counts == {"f": THREADS * N, "g": THREADS * 6 * (N // 10)}


@pytest.mark.parametrize("mode", ["trace", "count"])
def test_without_rseq_every_call_takes_the_fallback(exact_calls, mode):
    """glibc told not to register rseq: the cmpxchg buffer / lock inc row, still exact."""
    target = Target([str(exact_calls)], env=no_rseq_env())
    try:
        options = CaptureOptions(functions=("f",), mode=mode)
        with capturing(target.pid, options) as capture:
            answer = target.ask(f"calls {N}")
        recording = capture.recording
        assert not recording.metadata["rseq"]
        if mode == "count":
            assert recording.counts.tolist() == [THREADS * N]
        else:
            assert recording.lost == 0 and len(recording.records) == 2 * THREADS * N
            assert set(np.unique(recording.records["tid"]).tolist()) == tids_of(answer)
        with capturing(target.pid, CaptureOptions(functions=("f",), ring_records=64)) as capture:
            target.ask(f"calls {N}")
        assert len(capture.recording.records) == 2 * THREADS * N and capture.recording.lost == 0
        options = CaptureOptions(functions=("f",), ring_records=64, overflow=Overflow.DROP, entry_only=True)
        with capturing(target.pid, options) as capture:
            target.ask(f"calls {N}")
        assert len(capture.recording.records) + capture.recording.lost == THREADS * N
    finally:
        target.close()


def test_rseq_and_fallback_paths_side_by_side(target):
    """Buffers for CPU 0 only: threads on CPU 1 find cpu_id out of range and take the
    fallback buffer. Workers inherit the main thread's affinity, which steers them."""
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1")
    site = next(s for s in sites_in_process(target.pid, kinds={SiteKind.FENTRY}, functions=("f",)))
    with attach(target.pid) as session:
        abi = probe_thread_abi(session.process, exclude=frozenset({session.resident.agent_tid}))
        if abi.rseq_offset is None:
            pytest.skip("glibc without rseq here")
        one_cpu = dataclasses.replace(abi, cpus=1)
        tracer = Tracer(session.resident, [TracedSite(site.address, StubKind.ENTRY, site.insn)],
                        mode=Mode.TRACE, abi=one_cpu, ring_records=1 << 19)
        write_ring_header(tracer.data, tracer.ring)
        reader = RingReader(tracer.data)
        table = SiteTable.build(is_call=[False], address=[site.address])
        session.apply(tracer.patches)
        taken = {}
        try:
            for cpus in ({0}, {1}, {0, 1}):
                os.sched_setaffinity(target.pid, cpus)
                before = reader.committed().copy()
                target.ask(f"calls {N}")
                staging = np.empty(reader.geometry.buffers * reader.geometry.capacity, dtype=RAW_DTYPE)
                drained = reader.drain(staging)
                records = decode(staging, drained, table, cpus=1)
                assert len(records) == THREADS * N and reader.lost() == 0
                assert set(records["cpu"].tolist()) <= {0, UNKNOWN_CPU}
                for tid in np.unique(records["tid"]).tolist():
                    assert sorted(records["arg0"][records["tid"] == tid].tolist()) == list(range(N))
                taken[frozenset(cpus)] = (reader.committed() - before).tolist()
        finally:
            session.revert()
            del reader
            tracer.close()
    assert taken[frozenset({0})] == [THREADS * N, 0]  # rseq buffer of CPU 0
    assert taken[frozenset({1})] == [0, THREADS * N]  # the shared fallback buffer
    assert sum(taken[frozenset({0, 1})]) == THREADS * N
