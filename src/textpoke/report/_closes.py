"""The pass behind the tables of times (``textpoke report``): per frame its function,
thread, how it ended, duration, self time and recursion; nothing per row.

:class:`~._frames.FramePass` hands back every row in time order with what the
row-printing outputs need (indentation, call paths, leaves, the ENTER's caller).
A table of times per function needs much less: each frame's numbers, in any
order.  This pass computes only those, with two stable radix sorts per slice and
prefix sums (no search for parents, no way back to time order), and gives the same
numbers: ``tests/report/test_closes.py`` checks it against FramePass and the
per-record reference, chunked and sliced anywhere.

Pairing needs each thread's records in order, not the merged order of all
threads, so a file's chunk is read as stored (runs, one per buffer drained, not
merged: ``Recording.chunks(merged=False)``) and ordered by thread once, run by
run, on the thread that reads ahead (it needs nothing carried); a thread found
in two runs out of order has its chunk merged first.  The chunk is then cut
into slices of ``SLICE`` rows, small enough for their temporaries to stay in
the caches.  How a slice is paired (a thread's frames still open from earlier
slices are put in front of its rows as ENTER rows):

1. ENTER counts +1, a close -1: a running sum per thread is each row's *depth
   after* it.
2. Rows are ordered by (thread, depth after) (stable): groups.  An ENTER of
   level L (the depth before it) is in group L + 1, its close in group L.  Per
   (thread, level), ENTERs and closes alternate, so the ENTERs of level L taken
   in group order and the closes of level L taken in group order are the same
   frames in the same order, except for the frame of that level still open at
   the end (the last ENTER of each level below the thread's final depth) and
   the exit of a frame entered before the recording (the first close of each
   level below 0: the depth reaches a new low).  Less those, the k-th ENTER
   pairs with the k-th close.
3. Self time is the time a frame is on top of its thread's stack: the gaps
   after the rows whose depth after is its level + 1, from its ENTER to the row
   just before its close.  In group order these rows are one contiguous range
   of group L + 1, so self time is a difference of prefix sums of the gaps (it
   equals the duration less the children's, without finding any parent).
4. Recursion: rows ordered by (thread, function) (stable), a running count of
   each function's open frames; an ENTER made while one is open is nested.
5. The frames still open are carried to the next slice with their self time so
   far and the time of their thread's last row: the gap from it to the thread's
   next row, in a later slice, is the innermost open frame's.

A damaged recording (an EXIT naming another site than the frame it would
close) is repaired as FramePass repairs it (``_frames.repair``); frames still
open when the recording ends are closed at its end as CUT.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..ring.format import RECORD_DTYPE, in_time_order
from ._frames import (
    CLOSES, CUT, EXIT, IGNORED, RESYNC, UNWOUND, FrameCounts, PairedChunk, cut_at_end, repair,
)
from ._view import CALL, ENTER, RecordingView, group, read_ahead

#: Rows per slice: small enough for a slice's temporaries to stay in the caches (64 K rows
#: pair about a third faster than 256 K here, and far faster than a 1 M-record chunk whole).
SLICE = 1 << 16

#: Runs of one thread up to which a chunk's columns are put in thread order by copying
#: whole runs (beyond, one gather per column beats a Python loop over the runs).
_FEW_RUNS = 256

#: A thread's open frame, carried from one slice to the next.
CARRIED_DTYPE = np.dtype([
    ("tid", "<u4"), ("site", "<u4"), ("ts_ns", "<i8"),
    ("cpu", "<u2"),  # (its CUT row's: no table reads it, left 0)
    ("self_ns", "<i8"),  # time on top of the stack so far
    ("nested", "?"),  # entered while a frame of the same function was open on the thread
    ("since_ns", "<i8"),  # its thread's last row so far (time since then is the innermost frame's)
])

assert (CALL, EXIT, UNWOUND, ENTER) == (0, 1, 2, 3)  # (the kinds a file holds, as _steps reads them)
#: Per kind: +1 opens a frame, -1 closes one, 0 neither.
_STEP = np.zeros(256, dtype=np.int8)
_STEP[ENTER] = 1
_STEP[list(CLOSES)] = -1
#: Kinds the pass knows; any other is IGNORED (as FramePass does).
_KNOWN = np.zeros(256, dtype=bool)
_KNOWN[[CALL, EXIT, UNWOUND, ENTER, CUT, RESYNC, IGNORED]] = True
#: Kinds that count a call.
_ENTRY = np.zeros(256, dtype=bool)
_ENTRY[[CALL, ENTER]] = True


@dataclass(frozen=True)
class Closes:
    """What one slice adds to the tables, in no particular order."""

    tids: np.ndarray  # thread index -> tid
    entry_thread: np.ndarray  # ENTER and CALL records: thread index
    entry_function: np.ndarray  # ... and function id
    entry_only: np.ndarray  # ... bool: a CALL (entry-only)
    thread: np.ndarray  # frames closed (EXIT, UNWOUND, CUT, RESYNC) with a known start: thread index
    function: np.ndarray  # ... function id (of the ENTER: an UNWOUND may name another site)
    kind: np.ndarray  # ... how it ended
    duration: np.ndarray  # ... close - entry
    self_ns: np.ndarray  # ... time on top of its thread's stack (duration less its children's)
    nested: np.ndarray  # ... bool: inside a running call of the same function (recursion)
    orphan_thread: np.ndarray  # closes without an ENTER (entered before the recording began): thread index
    orphan_function: np.ndarray  # ... function id


@dataclass(frozen=True)
class _Part:
    """Records ordered by thread (tid order), each thread's in time order: the columns
    the pass reads (a file's chunk is ordered once, then cut into slices)."""

    tid: np.ndarray
    kind: np.ndarray  # kinds the pass does not know are IGNORED
    step: np.ndarray  # +1 ENTER, -1 close, 0 other
    site: np.ndarray
    ts: np.ndarray  # int64
    starts: np.ndarray  # where each thread's rows start

    def __len__(self) -> int:
        return len(self.ts)

    def __getitem__(self, rows: slice) -> _Part:
        lo, hi, _ = rows.indices(len(self))
        inside = self.starts[np.searchsorted(self.starts, lo, side="right"): np.searchsorted(self.starts, hi)]
        return _Part(tid=self.tid[rows], kind=self.kind[rows], step=self.step[rows], site=self.site[rows],
                     ts=self.ts[rows], starts=np.concatenate([[0], inside - lo]) if hi > lo else inside[:0])

    def records(self) -> np.ndarray:
        """As RECORD_DTYPE rows (caller, arg0 and cpu zero: the pass reads none)."""
        out = np.zeros(len(self), dtype=RECORD_DTYPE)
        for name in ("tid", "kind", "site"):
            out[name] = getattr(self, name)
        out["ts_ns"] = self.ts
        return out


def _by_thread(records: np.ndarray) -> _Part | None:
    """``records`` ordered by thread (stable), or None if a thread's are not in time order
    (runs not merged, a thread that moved between buffers: the caller merges them first)."""
    take, tid = _thread_order(records["tid"])
    ts = take(records["ts_ns"].view(np.int64))
    backwards = ts[1:] < ts[:-1]
    backwards &= tid[1:] == tid[:-1]  # where one thread's rows end and the next's begin
    if backwards.any():
        return None
    kind = take(records["kind"])
    if int(kind.max(initial=0)) > ENTER and not _KNOWN[np.flatnonzero(np.bincount(kind, minlength=256))].all():
        kind = np.where(_KNOWN[kind], kind, IGNORED).astype(np.uint8)
    starts = np.flatnonzero(np.concatenate([[True], tid[1:] != tid[:-1]])) if len(tid) else np.zeros(0, np.int64)
    return _Part(tid=tid, kind=kind, step=_steps(kind), site=take(records["site"]), ts=ts, starts=starts)


def _steps(kind: np.ndarray) -> np.ndarray:
    """Per row: +1 ENTER, -1 close, 0 other."""
    if int(kind.max(initial=0)) <= ENTER:  # the kinds a file holds: two compares beat a table look-up
        return (kind == ENTER).view(np.int8) * np.int8(2) - (kind != CALL).view(np.int8)
    return _STEP[kind]


def _in_thread_order(records: np.ndarray) -> _Part:
    part = _by_thread(records)
    if part is None:  # a thread's records are in two runs (it moved between buffers): merge them
        part = _by_thread(in_time_order(records))
        assert part is not None
    return part


def _thread_order(tid: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """How to put a column in a stable order by tid, and the tids in that order.  A thread
    runs a while before another takes its CPU, so a chunk's rows come in runs of one tid:
    ordering the runs (far fewer than rows) does it without sorting rows, and a few runs
    are copied whole rather than gathered row by row."""
    n = len(tid)
    starts = np.flatnonzero(np.concatenate([[True], tid[1:] != tid[:-1]])) if n else np.zeros(0, np.int64)
    if len(starts) > n // 16:  # threads interleaved row by row: sort the rows
        grouped = group(np.ascontiguousarray(tid))
        keys, count = grouped.inverse, len(grouped.values)
        order = np.argsort(keys.astype(np.uint16) if count <= 1 << 16 else keys, kind="stable")
        return (lambda column: column[order]), np.repeat(grouped.values, np.bincount(keys, minlength=count))
    lengths = np.diff(np.append(starts, n))
    by_tid = np.argsort(tid[starts], kind="stable")
    starts, lengths = starts[by_tid], lengths[by_tid]
    ordered = np.repeat(tid[starts], lengths)
    if 0 < len(starts) <= _FEW_RUNS:
        bounds = list(zip(starts.tolist(), (starts + lengths).tolist()))
        return (lambda column: np.concatenate([column[lo:hi] for lo, hi in bounds])), ordered
    # Run r's rows are starts[r] ... starts[r] + lengths[r] - 1, placed one run after another.
    order = np.arange(n, dtype=np.int64) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return (lambda column: column[order]), ordered


@dataclass
class _Rows:
    """One slice's rows ordered by thread, each thread's carried frames first (S-positions)."""

    tids: np.ndarray  # thread index -> tid
    thread: np.ndarray  # per row: thread index
    seg_len: np.ndarray  # rows per thread
    seg_end: np.ndarray  # per thread: its last S-position
    kind: np.ndarray
    step: np.ndarray  # +1 ENTER, -1 close, 0 other
    site: np.ndarray
    ts: np.ndarray  # int64
    carried_s: np.ndarray  # S-positions of the carried frames, in carried order


@dataclass
class _Pairs:
    """Frames matched in one slice (S-positions) and those left open."""

    enter: np.ndarray  # the ENTER of each frame closed in the slice
    close: np.ndarray  # its close
    orphans: np.ndarray  # closes without an ENTER
    opened: np.ndarray  # ENTERs still open, by thread, outermost first
    self_ns: np.ndarray  # per frame closed
    open_self_ns: np.ndarray  # per frame still open: so far
    since_ns: np.ndarray  # per thread: its last row's time


@dataclass(frozen=True)
class _Groups:
    """Rows grouped by an integer key: a stable order and each group's bounds in it."""

    order: np.ndarray
    size: np.ndarray  # rows per group id
    end: np.ndarray  # per group id: its end (exclusive) in ``order``
    values: np.ndarray | None  # the key of each group id, if keys were renumbered

    def ids(self, keys: np.ndarray) -> np.ndarray:
        return keys if self.values is None else np.searchsorted(self.values, keys)


def _keys(thread: np.ndarray, width: int, column: np.ndarray) -> tuple[np.ndarray, int]:
    """``thread * width + column`` (column in [0, width)), and the bound of those keys."""
    top = (int(thread[-1]) + 1) * width if len(thread) else 0  # thread indexes ascend
    if top >= 1 << 31:
        thread = thread.astype(np.int64)
    return thread * width + column, top


def _groups(keys: np.ndarray, top: int) -> _Groups:
    """Group non-negative keys below ``top``: one 16-bit radix pass when they fit, and
    renumbered first if ``top`` is far above their count (a table per key would not pay)."""
    values = None
    if top > 4 * len(keys) + 4096:
        grouped = group(keys)
        keys, values, top = grouped.inverse, grouped.values, len(grouped.values)
    order = np.argsort(keys.astype(np.uint16) if top <= 1 << 16 else keys, kind="stable")
    size = np.bincount(keys, minlength=top)
    return _Groups(order=order, size=size, end=np.cumsum(size), values=values)


def _spread(column: np.ndarray, rows: np.ndarray, others: np.ndarray, value: np.ndarray | int) -> np.ndarray:
    """``column`` at ``rows`` and ``value`` at ``others`` of a new column."""
    out = np.empty(len(rows) + len(others), dtype=column.dtype)
    out[rows] = column
    out[others] = value
    return out


def _ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each i, the integers lo[i] .. hi[i] - 1, and i for each of them."""
    n = np.maximum(hi - lo, 0).astype(np.int64)
    owner = np.repeat(np.arange(len(lo), dtype=np.int64), n)
    first = np.cumsum(n) - n
    return owner, np.arange(int(n.sum()), dtype=np.int64) - np.repeat(first - lo, n)


@dataclass
class ClosePass:
    """Walk a recording's records, slice after slice, as :class:`Closes`; see the module docstring."""

    view: RecordingView
    slice_rows: int = SLICE
    counts: FrameCounts = field(default_factory=FrameCounts)
    records: int = 0  # records read (the rows the pass adds itself not counted)

    def __post_init__(self) -> None:
        self._open = np.zeros(0, dtype=CARRIED_DTYPE)
        self._last_ns = 0
        self._function_of = self.view.function_of_site_id.astype(np.int32)  # narrower keys sort faster

    def closes(self) -> Iterator[Closes]:
        recording = self.view.recording
        # Chunks as stored (runs not merged), each ordered by thread on the reading thread
        # (it needs nothing carried), then paired here in slices.
        for part in read_ahead(map(_in_thread_order, recording.chunks(merged=False))):
            self.records += len(part)
            self._last_ns = max(self._last_ns, int(part.ts.max()))
            for lo in range(0, len(part), self.slice_rows):
                yield self._pair(part[lo: lo + self.slice_rows])
        final = _by_thread(cut_at_end(self._open, max(int(recording.end_ns), self._last_ns)))
        assert final is not None  # its rows all stand at the recording's end
        if len(final):
            yield self._pair(final)

    def _pair(self, part: _Part) -> Closes:
        result = self._try_pair(self._rows(part), strict=True)
        if isinstance(result, Closes):
            return result
        # A repaired slice matches by construction; pairing it by depth alone only guards
        # against looping on a case the replay did not foresee.
        repaired = _by_thread(repair(part.records(), result, self._open))
        assert repaired is not None
        result = self._try_pair(self._rows(repaired), strict=False)
        assert isinstance(result, Closes)
        return result

    def _try_pair(self, rows: _Rows, *, strict: bool) -> Closes | np.ndarray:
        """Pair one slice, or (strict) return the tids whose exits do not match, to repair."""
        pairs = self._match(rows)
        enter, close = pairs.enter, pairs.close
        close_kind = rows.kind[close]
        if strict:
            other = rows.site[close] != rows.site[enter]  # an UNWOUND may name another site
            if other.any() and (wrong := other & (close_kind == EXIT)).any():
                return rows.tids[np.unique(rows.thread[close[wrong]])]
        function = self._function_of.take(rows.site, mode="clip")  # past the table: unknown
        nested = self._nested(rows, pairs, function)
        entries = (rows.step > 0) | (rows.kind == CALL)
        entries[rows.carried_s] = False
        entry_s = np.flatnonzero(entries)
        self._count(rows, pairs)
        self._carry(rows, pairs, nested)
        return Closes(
            tids=rows.tids, entry_thread=rows.thread[entry_s], entry_function=function[entry_s],
            entry_only=rows.kind[entry_s] == CALL,
            thread=rows.thread[close], function=function[enter], kind=close_kind,
            duration=rows.ts[close] - rows.ts[enter], self_ns=pairs.self_ns, nested=nested[enter],
            orphan_thread=rows.thread[pairs.orphans], orphan_function=function[pairs.orphans],
        )

    # -- 1. by thread ------------------------------------------------------------------------
    def _rows(self, part: _Part) -> _Rows:
        carried = self._open
        kind, step, site, ts = part.kind, part.step, part.site, part.ts
        starts = part.starts
        tids, seg_len = part.tid[starts], np.diff(np.append(starts, len(part)))
        carried_s = np.zeros(0, dtype=np.int64)
        if len(carried):  # each thread's carried frames go before its rows (both come by tid)
            with_frames, frames = np.unique(carried["tid"], return_counts=True)
            mine = seg_len
            tids = np.union1d(tids, with_frames)
            at, where = np.searchsorted(tids, part.tid[starts]), np.searchsorted(tids, with_frames)
            seg_len = np.zeros(len(tids), dtype=np.int64)
            seg_len[at] += mine
            seg_len[where] += frames
            first = np.cumsum(seg_len) - seg_len
            carried_s = np.arange(len(carried)) + np.repeat(first[where] - (np.cumsum(frames) - frames), frames)
            # A thread's rows move past its carried frames (all that come before it in the slice).
            rows = np.arange(len(part)) + np.repeat(first[at] + seg_len[at] - mine - starts, mine)
            kind, step, site, ts = (_spread(column, rows, carried_s, value) for column, value in (
                (kind, ENTER), (step, 1), (site, carried["site"]), (ts, carried["ts_ns"])))
        return _Rows(
            tids=tids, thread=np.repeat(np.arange(len(tids), dtype=np.int32), seg_len), seg_len=seg_len,
            seg_end=np.cumsum(seg_len) - 1, kind=kind, step=step, site=site, ts=ts, carried_s=carried_s,
        )

    # -- 2. by (thread, depth after) -----------------------------------------------------------
    def _match(self, rows: _Rows) -> _Pairs:
        depth = rows.step.astype(np.int32)
        np.cumsum(depth, out=depth)  # (in place: a new array costs more than the sum)
        starts = rows.seg_end + 1 - rows.seg_len
        if len(starts) > 1:  # each thread's sum starts at 0
            depth -= np.repeat(depth[starts] - rows.step[starts], rows.seg_len)
        floor = np.minimum(np.minimum.reduceat(depth, starts), 0)
        final = depth[rows.seg_end]
        low = int(floor.min())
        width = int(depth.max()) - low + 1
        groups = _groups(*_keys(rows.thread, width, depth - low))
        step = rows.step[groups.order]
        enters = np.flatnonzero(step > 0)  # group-order indices
        closes = np.flatnonzero(step < 0)
        # The frame of each level L below the final depth is open: the last ENTER of group L + 1.
        owner, level = _ranges(floor, final)
        open_groups = groups.ids(owner * width + level + 1 - low)
        open_i = np.searchsorted(enters, groups.end[open_groups]) - 1
        # Each level L below 0 was reached by an exit without an entry: the first close of group L.
        owner, level = _ranges(floor, np.zeros_like(floor))
        start = groups.end - groups.size
        orphan_i = np.searchsorted(closes, start[groups.ids(owner * width + level - low)])
        paired = np.delete(enters, open_i)
        enter, close = groups.order[paired], groups.order[np.delete(closes, orphan_i)]
        assert len(enter) == len(close) and bool((close > enter).all()), "pairing out of step"
        pairs = _Pairs(enter=enter, close=close, orphans=groups.order[closes[orphan_i]],
                       opened=groups.order[enters[open_i]], self_ns=np.zeros(0, np.int64),
                       open_self_ns=np.zeros(0, np.int64), since_ns=np.zeros(0, np.int64))
        self._self_times(rows, groups, paired, enters[open_i], open_groups, pairs)
        return pairs

    def _self_times(self, rows: _Rows, groups: _Groups, paired: np.ndarray, opened: np.ndarray,
                    open_groups: np.ndarray, pairs: _Pairs) -> None:
        """Self time: gaps summed over a range of the ENTER's group (step 3 of the docstring).
        ``paired``, ``opened``: group-order indices of the ENTERs closed and still open."""
        carried = self._open  # in the order of rows.carried_s
        clock = rows.ts.copy()  # the carried rows stand at their thread's last row so far
        clock[rows.carried_s] = carried["since_ns"]
        gap = np.zeros(len(clock), dtype=np.int64)  # per row: until the thread's next row
        gap[:-1] = clock[1:] - clock[:-1]
        gap[rows.seg_end] = 0
        gap = gap[groups.order]
        upto = np.cumsum(gap)
        position = np.empty(len(gap), dtype=np.int64)  # S-position -> group-order index
        position[groups.order] = np.arange(len(gap))
        prior = np.zeros(len(gap), dtype=np.int64)  # self time before the slice
        prior[rows.carried_s] = carried["self_ns"]
        pairs.self_ns = upto[position[pairs.close - 1]] - upto[paired] + gap[paired] + prior[pairs.enter]
        pairs.open_self_ns = upto[groups.end[open_groups] - 1] - upto[opened] + gap[opened] + prior[pairs.opened]
        pairs.since_ns = clock[rows.seg_end]

    # -- 4. recursion --------------------------------------------------------------------------
    def _nested(self, rows: _Rows, pairs: _Pairs, function: np.ndarray) -> np.ndarray:
        """Per row (ENTERs): whether a frame of the same function was open on its thread."""
        frame_function = function.copy()
        frame_function[pairs.close] = function[pairs.enter]
        step = rows.step.copy()
        step[pairs.orphans] = 0  # their frames were never counted open
        width = int(frame_function.max()) + 1
        groups = _groups(*_keys(rows.thread, width, frame_function))
        step = step[groups.order]
        before = step.astype(np.int32)
        np.cumsum(before, out=before)
        before -= step
        first = np.minimum(groups.end - groups.size, len(step) - 1)
        running = before - np.repeat(before[first], groups.size)
        nested = np.empty(len(step), dtype=bool)
        nested[groups.order] = (running > 0) & (step > 0)
        nested[rows.carried_s] = self._open["nested"]
        return nested

    # -- 5. what is carried ----------------------------------------------------------------------
    def _carry(self, rows: _Rows, pairs: _Pairs, nested: np.ndarray) -> None:
        opened = pairs.opened
        new = np.zeros(len(opened), dtype=CARRIED_DTYPE)
        new["tid"] = rows.tids[rows.thread[opened]]
        new["site"] = rows.site[opened]
        new["ts_ns"] = rows.ts[opened]
        new["self_ns"] = pairs.open_self_ns
        new["nested"] = nested[opened]
        new["since_ns"] = pairs.since_ns[rows.thread[opened]]
        self._open = new

    def _count(self, rows: _Rows, pairs: _Pairs) -> None:
        def count(kind: int, kinds: np.ndarray = rows.kind) -> int:
            return int(np.count_nonzero(kinds == kind))  # (a bincount would widen every kind first)

        orphans = rows.kind[pairs.orphans]
        c = self.counts
        c.enters += count(ENTER) - len(self._open)
        c.returned += count(EXIT) - count(EXIT, orphans)
        c.unwound += count(UNWOUND) - count(UNWOUND, orphans)
        c.cut_end += count(CUT)
        c.resynced += count(RESYNC)
        c.cut_start += len(pairs.orphans)
        c.ignored += count(IGNORED)
        c.entry_only += count(CALL)


def closes_of(chunk: PairedChunk) -> Closes:
    """The same facts from a :class:`~._frames.FramePass` chunk (for outputs that need
    its rows too, such as the flame graph's page, which also has the table)."""
    kind = chunk.records["kind"]
    threads = group(chunk.records["tid"])
    thread = threads.inverse
    entry = _ENTRY[kind]
    timed = chunk.timed
    orphan = chunk.close & chunk.orphan
    return Closes(
        tids=threads.values, entry_thread=thread[entry], entry_function=chunk.function[entry],
        entry_only=kind[entry] == CALL, thread=thread[timed], function=chunk.function[timed], kind=kind[timed],
        duration=chunk.duration[timed], self_ns=chunk.self_ns[timed], nested=chunk.nested[timed],
        orphan_thread=thread[orphan], orphan_function=chunk.function[orphan],
    )
