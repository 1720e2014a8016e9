"""The summary report (``textpoke report``): calls per function, who called, which threads.

Plain aligned text in the shape of ``uftrace report`` / ``perf report --stdio``:
it is what a terminal, a pipe and a golden test all see alike.  The numbers are
computed in bulk by :func:`summarize` (a value a caller may also use directly);
:class:`SummaryReporter` only lays them out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TextIO

import numpy as np

from ._text import columns
from ._view import (
    Counts,
    RecordingLike,
    RecordingView,
    StableIds,
    _sorted_ids,
    calls_only,
    is_count_mode,
    recording_notes,
    pair_counts,
    top_per_major,
)

_KIND_ORDER = {"fentry": 0, "call": 1, "jmp": 2}
#: How many callers / threads a function row names before "+N more".
TOP = 3


class SortKey(str, Enum):
    CALLS = "calls"  # most calls first, ties by name
    NAME = "name"


@dataclass(frozen=True)
class FunctionRow:
    name: str
    calls: int
    callers: tuple[tuple[str, int], ...]  # the TOP most frequent, with counts
    caller_count: int  # distinct callers in all
    threads: tuple[tuple[int, int], ...]
    thread_count: int


@dataclass(frozen=True)
class ThreadRow:
    tid: int
    calls: int


@dataclass(frozen=True)
class Summary:
    pid: int
    command: str
    seconds: float
    records: int
    lost: int
    site_kinds: tuple[tuple[str, int], ...]
    count_mode: bool
    total_calls: int
    functions: tuple[FunctionRow, ...]  # only functions called at least once, sorted
    not_called: int  # traced functions never called
    threads: tuple[ThreadRow, ...]  # most calls first
    notes: tuple[str, ...] = ()  # the recording mode, losses by cause, a cut file
    per_thread: tuple[tuple[int, str, int], ...] = ()  # with threads: (tid, function, calls) by tid, calls

    @property
    def sites(self) -> int:
        return sum(n for _, n in self.site_kinds)

    def calls_of(self, name: str) -> int:
        return next((row.calls for row in self.functions if row.name == name), 0)


def summarize(recording: RecordingLike, *, sort: SortKey | str = SortKey.CALLS, top: int = TOP,
              threads_apart: bool = False) -> Summary:
    """Count calls per function, per caller and per thread, chunk after chunk, with numpy."""
    view = RecordingView(recording)
    names = view.function_names
    n_functions = len(names)
    per_function = np.zeros(n_functions, dtype=np.int64)
    callers: list[tuple[list[tuple[int, int]], int]]
    threads: list[tuple[list[tuple[int, int]], int]]
    thread_rows: tuple[ThreadRow, ...] = ()
    records = 0
    per_thread_rows: list[tuple[int, str, int]] = []
    caller_names: list[str] = []
    sorted_tids = np.zeros(0, dtype=np.int64)
    if is_count_mode(recording):
        counts = np.asarray(recording.counts, dtype=np.int64)[: len(view.sites)]
        np.add.at(per_function, view.function_of_site[: len(counts)], counts)
        callers = threads = [([], 0)] * n_functions
    else:
        by_caller, by_thread, tids = Counts(), Counts(), StableIds()
        for chunk in recording.chunks():
            records += len(chunk)
            calls = calls_only(chunk)
            function = view.functions(calls)
            per_function += np.bincount(function, minlength=n_functions)
            by_caller.add(function, view.caller_ids(calls["caller"]))
            by_thread.add(function, tids.ids(calls["tid"]))
        # Caller and thread ids in name/number order, so ties go by name (see pair_counts).
        caller_names, caller_rank = _sorted_ids(view.caller_names)
        majors, minors, counts_ = by_caller.arrays()
        # Return addresses in one function are one caller: add them up by name.
        callers = top_per_major(*pair_counts(*_regroup(majors, caller_rank[minors], counts_)),
                                n_major=n_functions, k=top)
        tid_values = np.array(tids.values, dtype=np.int64)
        tid_rank = np.argsort(np.argsort(tid_values, kind="stable"), kind="stable")
        majors, minors, counts_ = by_thread.arrays()
        if threads_apart:
            per_thread_rows = sorted(((int(tid_values[t]), names[f], int(c)) for f, t, c in
                                      zip(majors.tolist(), minors.tolist(), counts_.tolist())),
                                     key=lambda row: (row[0], -row[2] if SortKey(sort) is SortKey.CALLS else 0, row[1]))
        threads = top_per_major(*pair_counts(majors, tid_rank[minors] if len(minors) else minors, counts_),
                                n_major=n_functions, k=top)
        per_thread = np.zeros(len(tid_values), dtype=np.int64)
        np.add.at(per_thread, minors, counts_)
        sorted_tids = np.sort(tid_values)
        order = np.lexsort((tid_values, -per_thread))
        thread_rows = tuple(ThreadRow(tid=int(tid_values[i]), calls=int(per_thread[i])) for i in order)
    rows = []
    for f in np.flatnonzero(per_function).tolist():
        top_callers, n_callers = callers[f]
        top_threads, n_threads = threads[f]
        rows.append(FunctionRow(
            name=names[f],
            calls=int(per_function[f]),
            callers=tuple((caller_names[c], n) for c, n in top_callers),
            caller_count=n_callers,
            threads=tuple((int(sorted_tids[t]), n) for t, n in top_threads),
            thread_count=n_threads,
        ))
    if SortKey(sort) is SortKey.CALLS:
        rows.sort(key=lambda row: (-row.calls, row.name))
    else:
        rows.sort(key=lambda row: row.name)
    # The unknown-site slot is not a traced function: it only counts if records hit it.
    traced = set(view.function_of_site[: len(view.sites)].tolist())
    kinds = Counter(site.kind for site in view.sites)
    return Summary(
        pid=int(recording.pid),
        command=recording.command,
        seconds=max(0, int(recording.end_ns) - int(recording.start_ns)) / 1e9,
        records=records,
        lost=int(recording.lost),
        site_kinds=tuple(sorted(kinds.items(), key=lambda kv: (_KIND_ORDER.get(kv[0], len(_KIND_ORDER)), kv[0]))),
        count_mode=is_count_mode(recording),
        total_calls=int(per_function.sum()),
        functions=tuple(rows),
        not_called=sum(1 for f in traced if per_function[f] == 0),
        threads=thread_rows,
        notes=recording_notes(recording),
        per_thread=tuple(per_thread_rows),
    )


def _regroup(majors: np.ndarray, minors: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same pairs with equal (major, minor) added together."""
    keys, inverse = np.unique(majors << 32 | minors, return_inverse=True)
    return keys >> 32, keys & 0xFFFF_FFFF, np.bincount(inverse.reshape(-1), weights=counts).astype(np.int64)


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _rate(calls: int, seconds: float) -> str:
    if seconds <= 0:
        return "-"
    rate = calls / seconds
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"  # decimals only where they carry information


def _top(pairs: tuple[tuple[object, int], ...], total: int) -> str:
    text = ", ".join(f"{name} ({n:,})" for name, n in pairs)
    if total > len(pairs):
        text += f", +{total - len(pairs)} more"
    return text


def header_lines(summary: Summary) -> list[str]:
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in summary.site_kinds)
    what = (f"{_plural(summary.total_calls, 'call')} counted" if summary.count_mode
            else _plural(summary.records, "record"))
    lines = [
        f"pid {summary.pid}  command {summary.command}",
        f"duration {summary.seconds:.3f} s, {what}, {summary.lost:,} lost, "
        f"{_plural(summary.sites, 'site')}" + (f" ({kinds})" if kinds else ""),
    ]
    if summary.lost:
        seen = (summary.total_calls if summary.count_mode else summary.records) + summary.lost
        lines.append(
            f"LOST {_plural(summary.lost, 'record')} ({_share(summary.lost, seen)} of all calls): "
            "every count below is a lower bound"
        )
    lines += list(summary.notes)
    if summary.count_mode:
        lines.append("count mode: exact calls per function; no callers, threads or times were recorded")
    return lines


def render_summary(summary: Summary, out: TextIO, *, limit: int | None = None,
                   label: Callable[[int], str] = str) -> None:
    lines = header_lines(summary)
    lines.append("")
    shown = summary.functions if limit is None else summary.functions[:limit]
    total = summary.total_calls
    if not summary.functions:
        lines.append("  no traced function was called")
    elif summary.count_mode:
        lines += columns(
            ("calls", "calls/s", "share", "function"),
            [(f"{r.calls:,}", _rate(r.calls, summary.seconds), _share(r.calls, total), r.name) for r in shown],
            right=3,
        )
    else:
        lines += columns(
            ("calls", "calls/s", "share", "function", "top callers", "threads"),
            [(f"{r.calls:,}", _rate(r.calls, summary.seconds), _share(r.calls, total), r.name,
              _top(r.callers, r.caller_count), _top(r.threads, r.thread_count)) for r in shown],
            right=3,
        )
    notes = []
    if len(shown) < len(summary.functions):
        notes.append(f"{_plural(len(summary.functions) - len(shown), 'more function')} not shown (--limit)")
    if summary.not_called:
        # With records lost, a function without records may still have been called.
        notes.append(f"{_plural(summary.not_called, 'traced function')} "
                     + ("with no record kept" if summary.lost else "never called"))
    if notes:
        lines += ["", "  " + "; ".join(notes)]
    if summary.threads:
        lines += ["", *columns(("calls", "share", "thread"),
                                [(f"{t.calls:,}", _share(t.calls, summary.records), str(t.tid))
                                 for t in summary.threads], right=2)]
    if summary.per_thread:
        seen: dict[int, int] = {}
        shown_rows = []
        for row in summary.per_thread:  # --limit applies per thread
            seen[row[0]] = seen.get(row[0], 0) + 1
            if limit is None or seen[row[0]] <= limit:
                shown_rows.append(row)
        lines += ["", *columns(("calls", "thread", "function"),
                                [(f"{calls:,}", label(tid), name) for tid, name, calls in shown_rows], right=1)]
    out.write("\n".join(lines) + "\n")


@dataclass(frozen=True)
class SummaryReporter:
    """``textpoke report``: one row per called function."""

    sort: SortKey = SortKey.CALLS
    limit: int | None = None
    threads: bool = False  # also a row per thread and function

    def render(self, recording: RecordingLike, out: TextIO) -> None:
        render_summary(summarize(recording, sort=self.sort, threads_apart=self.threads), out, limit=self.limit,
                       label=RecordingView(recording).thread_label)
