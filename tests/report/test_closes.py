"""The times pass (report/_closes.py) against the per-record reference and against
FramePass, on random programs with every way of leaving a frame, damaged or not,
chunked anywhere, sliced anywhere, with chunks handed out as unmerged runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

from textpoke.report._closes import ClosePass, _groups, _thread_order
from textpoke.report._paths import PathTimes
from textpoke.report._view import RecordingView
from textpoke.report.timed import summarize_times
from textpoke.ring.format import in_time_order

from .synth import BASE, CALL, FUNCTIONS, Chunked, recording, records, reference
from .test_frames import random_program


class Runs(Chunked):
    """Chunks stored as a file stores them: runs, one per buffer (``buffer(records)`` says
    which took each record), each in time order; merged when asked (``in_time_order``)."""

    def __init__(self, recording, bounds, buffer) -> None:
        super().__init__(recording, bounds)
        self._buffer = buffer

    def chunks(self, *, merged: bool = True) -> Iterator[np.ndarray]:
        for part in super().chunks():
            runs = part[np.argsort(self._buffer(part), kind="stable")]
            yield in_time_order(runs) if merged else runs

    @property
    def records(self) -> np.ndarray:
        """Every record as a reader sees them (a thread's records with equal times in two
        runs come in run order)."""
        return np.concatenate(list(self.chunks()))


def closes_pass(rec, slice_rows: int) -> tuple[ClosePass, list]:
    frames = ClosePass(RecordingView(rec), slice_rows=slice_rows)
    return frames, list(frames.closes())


def check(rows: np.ndarray, rec, *, slice_rows: int) -> ClosePass:
    end_ns = int(rec.end_ns)
    frames, slices = closes_pass(rec, slice_rows)
    ref = reference(rows, FUNCTIONS, end_ns=end_ns)
    names = frames.view.function_names
    got = Counter((int(t), names[f], int(d), int(s), int(k), bool(n)) for c in slices for t, f, d, s, k, n in zip(
        c.tids[c.thread], c.function, c.duration, c.self_ns, c.kind, c.nested))
    want = Counter((f.tid, f.function, f.end - f.start, f.self_ns, f.ended, f.nested) for f in ref["frames"])
    assert got == want
    orphans = Counter((int(t), names[f]) for c in slices for t, f in zip(c.tids[c.orphan_thread], c.orphan_function))
    assert orphans == Counter((tid, fn) for tid, fn, _ in ref["orphans"])
    entries = Counter((int(t), names[f], bool(e)) for c in slices
                      for t, f, e in zip(c.tids[c.entry_thread], c.entry_function, c.entry_only))
    kinds = rows["kind"]
    want_entries = Counter((int(r["tid"]), FUNCTIONS[r["site"]], bool(r["kind"] == CALL))
                           for r in rows[(kinds == CALL) | (kinds == 3)])
    assert entries == want_entries
    assert frames.records == len(rows)
    assert frames.counts.ignored == ref["ignored"]
    assert frames.counts.cut_start == len(ref["orphans"])
    return frames


def chunkings(rows: np.ndarray, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    n = len(rows)
    return [[], sorted(rng.choice(np.arange(1, n), 5, replace=False).tolist()), list(range(37, n, 37))]


@pytest.mark.parametrize("damage", [0.0, 0.08])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("slice_rows", [1 << 16, 29, 3])
def test_matches_reference_and_frame_pass(seed, slice_rows, damage):
    rows = random_program(seed + (100 if damage else 0), damage=damage)
    rec = recording(rows, end=int(rows["ts_ns"][-1]) - BASE + 100)
    by_thread = (lambda part: part["tid"] % 2)  # each thread's records in one run
    anywhere = (lambda part: np.random.default_rng(len(part)).integers(0, 3, len(part)))  # threads move
    for bounds in chunkings(rows, seed):
        for buffer in (by_thread, anywhere):
            runs = Runs(rec, bounds, buffer)
            frames = check(runs.records, runs, slice_rows=slice_rows)
            if not damage and buffer is by_thread:  # (merged runs put equal times in run order)
                assert frames.counts.resynced == frames.counts.ignored == 0
    # The tables are those FramePass's chunks give (both ways of reading, per thread too).
    runs = Runs(rec, chunkings(rows, seed)[1], anywhere)
    for threads in (False, True):
        fast = summarize_times(runs, threads=threads)
        slow = summarize_times(runs, threads=threads, paths=PathTimes(runs))
        assert fast == slow


def test_recursion_across_slices_and_open_frames_at_both_ends():
    # Thread 1: inside f and g before the recording (their exits have no entries), then
    # f recursing 3 deep across every slice boundary, then main left open at the end.
    rows = [(0, 1, "X", "lex"), (5, 1, "X", "parse"), (10, 1, "E", "fib"), (20, 1, "E", "fib"),
            (30, 1, "E", "fib"), (40, 1, "X", "fib"), (50, 1, "X", "fib"), (60, 1, "X", "fib"),
            (70, 1, "E", "main"), (80, 1, "E", "fib"), (90, 1, "U", "fib")]
    made = records(rows)
    rec = recording(made, end=200)
    for slice_rows in (1, 2, 3, 1 << 16):
        frames = check(made, rec, slice_rows=slice_rows)
        assert frames.counts.cut_start == 2 and frames.counts.cut_end == 1


def test_unknown_kinds_and_stray_exits_as_frame_pass_counts_them():
    rows = [(0, 1, "E", "main"), (10, 1, "X", "lex"), (20, 1, "E", "parse"), (30, 1, "X", "main"),
            (40, 1, "X", "main")]
    made = records(rows)
    made["kind"][2] = 9  # a kind no tracer writes
    rec = recording(made, end=100)
    frames, _ = closes_pass(rec, 1 << 16)
    assert (frames.counts.ignored, frames.counts.returned, frames.counts.cut_start) == (2, 1, 1)
    assert summarize_times(rec) == summarize_times(rec, paths=PathTimes(rec))


@pytest.mark.parametrize("top", [50, 1 << 20, 1 << 40])
def test_groups_dense_radix_or_renumbered(top):
    keys = np.random.default_rng(top % 1000).integers(0, top, 5_000)
    groups = _groups(keys, top)
    assert np.array_equal(groups.order, np.argsort(keys, kind="stable"))
    values, counts = np.unique(keys, return_counts=True)
    ids = groups.ids(values)
    assert np.array_equal(groups.size[ids], counts)
    assert np.array_equal(groups.end[ids], np.cumsum(counts))


@pytest.mark.parametrize("runs", [0, 1, 5, 300, 9_000])
def test_thread_order_by_runs_or_by_sort(runs):
    """A chunk's rows put in thread order: whole runs copied, runs ordered, or rows sorted."""
    rng = np.random.default_rng(runs)
    lengths = rng.integers(1, 60, runs) if runs < 9_000 else np.ones(runs, dtype=np.int64)
    tid = np.repeat(rng.integers(1, 9, runs), lengths).astype(np.uint32)
    column = np.arange(len(tid)) * 7
    take, ordered = _thread_order(tid)
    order = np.argsort(tid, kind="stable")
    assert np.array_equal(take(column), column[order]) and np.array_equal(ordered, tid[order])
