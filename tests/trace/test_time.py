"""Timestamps: CLOCK_MONOTONIC ns, in the capture window, monotonic per thread, to the microsecond."""

from __future__ import annotations

import numpy as np
import pytest

from textpoke.capture import CaptureOptions
from textpoke.ring import RecordKind

from .conftest import capturing

TICKS = 10
MS = 1_000_000


@pytest.mark.parametrize("options", [CaptureOptions(functions=("tick",)), CaptureOptions(calls_to=("tick",))],
                         ids=["entry", "call-site"])
def test_timestamps_are_the_targets_monotonic_clock(target, options):
    """tick(now) then nanosleep(1 ms), 10 times: each record's ts_ns is the now it
    carries as arg0 (read by the target with clock_gettime just before the call),
    to a few us, and records 1 ms apart in the target are 1 ms +- 0.3 ms apart."""
    with capturing(target.pid, options) as capture:
        answer = target.ask(f"tick {TICKS}")
    recording = capture.recording
    records = recording.records
    records = records[records["kind"] != RecordKind.EXIT]  # the entries (and call-site calls)
    sent = np.array([int(t) for t in answer["t"].split(",")], dtype=np.int64)
    assert len(records) == TICKS
    assert (records["arg0"].astype(np.int64) == sent).all()
    ts = records["ts_ns"].astype(np.int64)
    # Same clock: each record is taken right after the target read its clock (a
    # few hundred ns; more only if the thread was preempted in between).
    late = ts - sent
    assert (late > -5_000).all() and np.median(late) < 20_000, late
    gaps = np.diff(ts)
    assert np.median(np.abs(gaps - np.diff(sent))) < 20_000, (gaps, np.diff(sent))
    # nanosleep(1 ms) sleeps at least 1 ms, more on a busy machine: the shortest
    # of the gaps shows the scale is right.
    assert abs(gaps.min() - MS) < 0.3 * MS, gaps
    assert recording.start_ns <= ts.min() and ts.max() <= recording.end_ns


def test_records_sorted_and_per_thread_monotonic(target):
    with capturing(target.pid, CaptureOptions(functions=("f",))) as capture:
        target.ask("calls 2000")
    records = capture.recording.records
    ts = records["ts_ns"].astype(np.int64)
    assert (np.diff(ts) >= 0).all()
    records = records[records["kind"] == RecordKind.ENTER]
    for tid in np.unique(records["tid"]):
        mine = records[records["tid"] == tid]
        assert (np.diff(mine["arg0"].astype(np.int64)) == 1).all()  # time order == call order
