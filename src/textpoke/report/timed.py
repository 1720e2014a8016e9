"""``textpoke report`` for a function-graph recording: where the time goes, per function.

The columns ``uftrace report`` has, one row per function (or per thread and
function with ``threads``), sortable by each:

- ``total``: time from entry to exit of its calls; a call made while another
  call of the same function runs on the same thread (recursion) adds nothing,
  its time being inside the outer call's already;
- ``self``: its calls' time less the time of the traced calls they made;
- ``avg``, ``min``, ``max``: the duration of one call (every call, recursive ones too);
- ``calls``: entries seen (entry-only calls too, though they have no time).

Times are measured from the records: entry and exit timestamps of the same
frame.  Frames that did not end with a return are counted in the header and in
a row's notes: unwound frames are timed to when the tracer saw them gone (an
upper bound), frames cut off by the end to the recording's end (a lower bound);
exits without an entry (running when the recording began) and entry-only calls
are counted, never timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TextIO

import numpy as np

from .._errors import UsageError
from ._closes import ClosePass, Closes, closes_of
from ._frames import CUT, RESYNC, UNWOUND, FrameCounts, FramePass
from ._paths import PathTimes
from ._text import columns, duration_text, frame_lines, plural, recording_head, site_kinds
from ._view import RecordingLike, RecordingView, StableIds, recording_notes

class TimeKey(str, Enum):
    TOTAL = "total"
    SELF = "self"
    CALLS = "calls"
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    NAME = "name"


@dataclass(frozen=True)
class TimedRow:
    name: str
    tid: int | None  # per-thread rows: the thread
    calls: int  # entries (ENTER and entry-only CALL records)
    frames: int  # calls with a time (returned, unwound, cut off by the end, resynchronized)
    total_ns: int  # recursion counted once (see the module docstring)
    self_ns: int
    duration_sum_ns: int  # every timed call's duration, recursive ones too
    min_ns: int | None
    max_ns: int | None
    unwound: int = 0
    cut_end: int = 0
    cut_start: int = 0
    entry_only: int = 0
    resynced: int = 0

    @property
    def avg_ns(self) -> int | None:
        return round(self.duration_sum_ns / self.frames) if self.frames else None

    def notes(self) -> str:
        parts = [(self.unwound, "unwound"), (self.cut_end, "cut off by the end"),
                 (self.cut_start, "cut off by the start"), (self.entry_only, "entry-only"),
                 (self.resynced, "resynchronized")]
        return ", ".join(f"{n:,} {what}" for n, what in parts if n)


@dataclass(frozen=True)
class TimedSummary:
    head: tuple[str, ...]  # pid/command, duration/records/sites, losses and notes
    counts: FrameCounts
    rows: tuple[TimedRow, ...]
    not_called: int  # traced functions never entered
    metadata_lines: tuple[str, ...] = ()
    threads: bool = False

    def row(self, name: str, tid: int | None = None) -> TimedRow:
        return next(r for r in self.rows if r.name == name and r.tid == tid)


_FIELDS = ("calls", "frames", "total", "dursum", "self", "unwound", "cut_end", "cut_start", "entry_only", "resynced")
_NONE = np.iinfo(np.int64).max


class _Stats:
    """Per key (dense ids handed out as keys appear), the sums, min and max."""

    def __init__(self) -> None:
        self.sums = np.zeros((len(_FIELDS), 0), dtype=np.int64)
        self.min = np.zeros(0, dtype=np.int64)
        self.max = np.zeros(0, dtype=np.int64)

    def _grow(self, size: int) -> None:
        have = self.sums.shape[1]
        if size <= have:
            return
        size = max(size, 2 * have)
        sums = np.zeros((len(_FIELDS), size), dtype=np.int64)
        sums[:, :have] = self.sums
        self.sums = sums
        self.min = np.append(self.min, np.full(size - have, _NONE, dtype=np.int64))
        self.max = np.append(self.max, np.full(size - have, -1, dtype=np.int64))

    def add(self, closes: Closes, ids: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> None:
        """Add one slice; ``ids(tids, threads, functions)`` gives each (thread, function)'s key
        (``tids``: thread index -> tid)."""
        entry = ids(closes.tids, closes.entry_thread, closes.entry_function)
        frame = ids(closes.tids, closes.thread, closes.function)
        orphan = ids(closes.tids, closes.orphan_thread, closes.orphan_function)
        self._grow(max((int(a.max()) + 1 for a in (entry, frame, orphan) if len(a)), default=0))
        s = self.sums
        size = s.shape[1]
        dur = closes.duration
        s[0] += np.bincount(entry, minlength=size)
        s[1] += np.bincount(frame, minlength=size)
        np.add.at(s[2], frame, np.where(closes.nested, 0, dur))  # int64 sums: exact
        np.add.at(s[3], frame, dur)
        np.add.at(s[4], frame, closes.self_ns)
        for row, what in ((5, UNWOUND), (6, CUT), (9, RESYNC)):
            s[row] += np.bincount(frame[closes.kind == what], minlength=size)
        s[7] += np.bincount(orphan, minlength=size)
        s[8] += np.bincount(entry[closes.entry_only], minlength=size)
        np.minimum.at(self.min, frame, dur)
        np.maximum.at(self.max, frame, dur)

    def row(self, i: int, name: str, tid: int | None) -> TimedRow:
        calls, frames, total, dursum, self_ns, unwound, cut_end, cut_start, entry_only, resynced = (
            int(v) for v in self.sums[:, i])
        return TimedRow(name=name, tid=tid, calls=calls, frames=frames, total_ns=total, self_ns=self_ns,
                        duration_sum_ns=dursum, min_ns=int(self.min[i]) if frames else None,
                        max_ns=int(self.max[i]) if frames else None, unwound=unwound, cut_end=cut_end,
                        cut_start=cut_start, entry_only=entry_only, resynced=resynced)

    def used(self) -> np.ndarray:
        return np.flatnonzero(self.sums.any(axis=0))


def _sort_rows(rows: list[TimedRow], key: TimeKey) -> list[TimedRow]:
    def value(row: TimedRow) -> int:
        v = {TimeKey.TOTAL: row.total_ns, TimeKey.SELF: row.self_ns, TimeKey.CALLS: row.calls,
             TimeKey.AVG: row.avg_ns, TimeKey.MIN: row.min_ns, TimeKey.MAX: row.max_ns}[key]
        return -1 if v is None else v

    if key is TimeKey.NAME:
        return sorted(rows, key=lambda r: (r.tid or 0, r.name))
    return sorted(rows, key=lambda r: (r.tid or 0, -value(r), r.name))


def summarize_times(recording: RecordingLike, *, sort: TimeKey | str = TimeKey.TOTAL, threads: bool = False,
                    paths: PathTimes | None = None) -> TimedSummary:
    """One pass over the records: frames paired (``_closes``: the numbers alone), then
    added up per function; with ``paths``, the pass that also interns call paths
    (``_frames``) adds up both."""
    view = RecordingView(recording) if paths is None else paths.view
    names = view.function_names
    width = len(names)
    stats = _Stats()
    keys = StableIds()

    def ids(tids: np.ndarray, thread: np.ndarray, functions: np.ndarray) -> np.ndarray:
        return keys.ids(tids.astype(np.int64)[thread] * width + functions) if threads else functions

    frames: ClosePass | FramePass
    if paths is None:
        frames = ClosePass(view)
        for closes in frames.closes():
            stats.add(closes, ids)
        records = frames.records
    else:
        frames = paths.frames
        records = 0
        for chunk in frames.chunks():
            kind = chunk.records["kind"]
            records += len(kind) - int(np.count_nonzero((kind == CUT) | (kind == RESYNC)))
            stats.add(closes_of(chunk), ids)
            paths.add(chunk)
    rows = []
    for i in stats.used().tolist():
        if threads:
            tid, function = divmod(keys.values[i], width)
            rows.append(stats.row(i, names[function], tid))
        else:
            rows.append(stats.row(i, names[i], None))
    called = {r.name for r in rows if r.calls or r.cut_start}
    traced = {names[f] for f in view.function_of_site[: len(view.sites)].tolist()}
    head = recording_head(recording, records=records, site_kinds=site_kinds(view))
    lost = int(recording.lost)
    if lost:
        head.append(f"LOST {plural(lost, 'record')} ({100 * lost / (records + lost):.1f}% of all records): "
                    "calls are lower bounds and frames whose entry or exit was lost are cut off")
    head += recording_notes(recording)
    return TimedSummary(head=tuple(head), counts=frames.counts, rows=tuple(_sort_rows(rows, TimeKey(sort))),
                        not_called=len(traced - called),
                        metadata_lines=tuple(frame_lines(frames.counts, recording.metadata)), threads=threads)


def _time(ns: int | None) -> str:
    return "-" if ns is None else duration_text(ns)


def timed_lines(summary: TimedSummary, *, limit: int | None = None,
                label: Callable[[int], str] | None = None) -> list[str]:
    lines = [*summary.head, *summary.metadata_lines, ""]
    shown = summary.rows
    if limit is not None and not summary.threads:
        shown = shown[:limit]
    elif limit is not None:
        per: dict[int | None, int] = {}
        kept = []
        for row in shown:
            per[row.tid] = per.get(row.tid, 0) + 1
            if per[row.tid] <= limit:
                kept.append(row)
        shown = tuple(kept)
    with_notes = any(r.notes() for r in shown)
    header: tuple[str, ...] = ("total", "self", "avg", "min", "max", "calls")
    if summary.threads:
        header += ("thread",)
    header += ("function", "notes") if with_notes else ("function",)
    table = []
    for r in shown:
        cells: tuple[str, ...] = (_time(r.total_ns if r.frames else None), _time(r.self_ns if r.frames else None),
                                  _time(r.avg_ns), _time(r.min_ns), _time(r.max_ns), f"{r.calls:,}")
        if summary.threads:
            cells += (label(r.tid) if label is not None and r.tid is not None else str(r.tid),)
        cells += (r.name, r.notes()) if with_notes else (r.name,)
        table.append(cells)
    if table:
        lines += columns(header, table, right=6)
    else:
        lines.append("  no traced function was called")
    notes = []
    if len(shown) < len(summary.rows):
        notes.append(f"{plural(len(summary.rows) - len(shown), 'more row')} not shown (--limit)")
    if summary.not_called:
        notes.append(f"{plural(summary.not_called, 'traced function')} never called")
    if notes:
        lines += ["", "  " + "; ".join(notes)]
    return lines


@dataclass(frozen=True)
class TimedReporter:
    """``textpoke report`` of a function-graph recording."""

    sort: TimeKey = TimeKey.TOTAL
    threads: bool = False
    limit: int | None = None

    def render(self, recording: RecordingLike, out: TextIO) -> None:
        if recording.counts is not None:
            raise UsageError("a --count recording has no times")
        summary = summarize_times(recording, sort=self.sort, threads=self.threads)
        view = RecordingView(recording)
        out.write("\n".join(timed_lines(summary, limit=self.limit, label=view.thread_label)) + "\n")
