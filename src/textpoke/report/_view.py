"""What every reporter needs besides the records: names, ids and labels, in bulk.

A recording can hold hundreds of millions of records, in chunks (see
``Recording.chunks``), so nothing here holds them all or loops over records in
Python: per-record columns are derived with numpy, a chunk at a time (a lookup
table from site id to function; :func:`group` for callers and threads), and
only *distinct* values (sites, caller addresses, threads) are touched one by
one, e.g. to symbolize them. Ids handed out for callers and threads are stable
across chunks, so counts can be added up chunk after chunk.
"""

from __future__ import annotations

import os
import queue
import shlex
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, TypeVar

import numpy as np

from ..ring.format import RecordKind


class SiteLike(Protocol):
    id: int
    address: int
    kind: str
    function: str
    target_name: str | None
    target: int | None


class ThreadLike(Protocol):
    pid: int
    name: str


class RecordingLike(Protocol):
    """What the reporters read from a ``textpoke.ring.recording.Recording``."""

    sites: tuple[SiteLike, ...]
    lost: int
    pid: int
    command: str
    start_ns: int
    end_ns: int
    counts: np.ndarray | None
    metadata: dict[str, Any]
    threads: dict[int, ThreadLike]
    cut: str | None

    @property
    def record_count(self) -> int: ...

    def chunks(self, *, merged: bool = True) -> Iterator[np.ndarray]: ...

    def symbolize(self, addresses: np.ndarray) -> list[str]: ...


#: The name given to records whose site id is not in the recording's site table
#: (a damaged file); they are still counted, never dropped.
UNKNOWN_SITE = "<unknown site>"
#: Linux keeps 15 characters of a thread's name (TASK_COMM_LEN - 1); ftrace shows that.
_COMM_LEN = 15
CALL = int(RecordKind.CALL)
#: A call whose exit follows (RecordKind.ENTER in function-graph recordings).
ENTER = int(getattr(RecordKind, "ENTER", 3))


def comm_of(command: str) -> str:
    """The short program name ftrace-style lines start with (``./bin/prog -x`` -> ``prog``)."""
    try:
        words = shlex.split(command)  # the engine stores shlex.join(argv)
    except ValueError:
        words = command.split()
    first = words[0] if words else "?"
    return (os.path.basename(first) or first)[:_COMM_LEN]


def is_count_mode(recording: RecordingLike) -> bool:
    return recording.counts is not None


def _sorted_ids(names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct names in sorted order and, for each input, the index of its name.

    Sorted ids make every "ties broken by name" rule a plain integer comparison."""
    distinct = sorted(set(names))
    index = {name: i for i, name in enumerate(distinct)}
    return distinct, np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names))


@dataclass(frozen=True)
class Grouped:
    """Distinct values of one per-record column and each record's index into them."""

    values: np.ndarray  # sorted distinct values
    inverse: np.ndarray  # per record: index into ``values``


#: A column whose values span less than this (and not much more than its length) is
#: grouped with a dense table instead of a sort; 1 << 22 is the kernel's largest
#: pid_max, so thread ids always qualify.  The tables cost a few bytes per value.
_DENSE_SPAN = 1 << 22


def _dense(span: int, n: int) -> bool:
    return span <= _DENSE_SPAN and span <= 8 * n


def group(column: np.ndarray) -> Grouped:
    """``np.unique(column, return_inverse=True)``, without sorting when it can.

    Thread ids (< pid_max) and the return addresses of one binary span a few
    million values at most: a dense presence table finds the distinct values in
    linear time, several times faster than the sort ``np.unique`` does on 10 M
    records.  Wider columns (addresses in many libraries) fall back to the sort."""
    if len(column) == 0:
        return Grouped(values=column[:0].copy(), inverse=np.zeros(0, dtype=np.int64))
    low, high = int(column.min()), int(column.max())
    if not _dense(high - low + 1, len(column)):
        values, inverse = np.unique(column, return_inverse=True)
        return Grouped(values=values, inverse=inverse.reshape(-1))
    offsets = (column - column.dtype.type(low)).astype(np.int64)
    present = np.zeros(high - low + 1, dtype=bool)
    present[offsets] = True
    index = np.cumsum(present, dtype=np.int32) - 1
    values = (np.flatnonzero(present) + low).astype(column.dtype)
    return Grouped(values=values, inverse=index[offsets])


class StableIds:
    """Stable ids for the distinct values of a column seen chunk after chunk.

    ``ids(column)`` gives each record the id of its value (ids in order of first
    appearance); only each chunk's distinct values go through Python."""

    def __init__(self) -> None:
        self._index: dict[int, int] = {}
        self.values: list[int] = []

    def ids(self, column: np.ndarray) -> np.ndarray:
        groups = group(column)
        index = self._index
        local = np.empty(len(groups.values), dtype=np.int64)
        for i, value in enumerate(groups.values.tolist()):
            gid = index.get(value)
            if gid is None:
                gid = index[value] = len(self.values)
                self.values.append(value)
            local[i] = gid
        return local[groups.inverse]

    def __len__(self) -> int:
        return len(self.values)


class Counts:
    """Counts of (major, minor) id pairs, added up chunk after chunk."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def add(self, major: np.ndarray, minor: np.ndarray) -> None:
        if not len(major):
            return
        width = int(minor.max()) + 1
        key = major.astype(np.int64) * width + minor
        top = int(key.max()) + 1
        if _dense(top, len(key)):  # a counting table beats sorting a million keys
            dense = np.bincount(key, minlength=top)
            keys = np.flatnonzero(dense)
            counts = dense[keys]
        else:
            keys, counts = np.unique(key, return_counts=True)
        majors, minors = np.divmod(keys, width)
        keys = majors << 32 | minors
        total = self._counts
        for k, c in zip(keys.tolist(), counts.tolist()):
            total[k] = total.get(k, 0) + c

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(majors, minors, counts) over every pair seen."""
        keys = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
        counts = np.fromiter(self._counts.values(), dtype=np.int64, count=len(self._counts))
        return keys >> 32, keys & 0xFFFF_FFFF, counts


class RecordingView:
    """Names and ids of one recording's sites, callers and threads (computed lazily)."""

    def __init__(self, recording: RecordingLike) -> None:
        self.recording = recording
        self.sites = tuple(recording.sites)
        self.callers = StableIds()
        self._caller_names: list[str] = []
        self._opaque_numbers: dict[int, int] = {}

    # -- sites and functions ---------------------------------------------------------

    @cached_property
    def _site_lookup(self) -> np.ndarray:
        """Site id -> position in ``sites`` (``len(sites)``: the unknown slot)."""
        n = len(self.sites)
        ids = np.fromiter((int(s.id) for s in self.sites), dtype=np.int64, count=n)
        lookup = np.full((int(ids.max()) + 2) if n else 1, n, dtype=np.int64)
        lookup[ids] = np.arange(n, dtype=np.int64)
        return lookup

    def site_position(self, site_ids: np.ndarray) -> np.ndarray:
        """Per record: the position of its site in ``sites`` (``len(sites)`` if unknown)."""
        lookup = self._site_lookup
        return lookup.take(np.minimum(site_ids.astype(np.int64), len(lookup) - 1))

    @cached_property
    def site_names(self) -> list[str]:
        """Per site position (plus the unknown slot): the name of the function it traces.

        An fentry site traces the function it is in; a call/jmp site traces its
        callee, named by the site table or, failing that, by symbolizing the
        callee's address."""
        names: list[str | None] = [site.function if site.kind == "fentry" else site.target_name
                                   for site in self.sites]
        missing = [i for i, name in enumerate(names) if name is None and self.sites[i].target is not None]
        if missing:
            targets = np.array([self.sites[i].target for i in missing], dtype=np.uint64)
            for i, name in zip(missing, self.recording.symbolize(targets)):
                names[i] = name
        resolved = [name if name is not None else f"<{site.kind} site {site.address:#x}>"
                    for name, site in zip(names, self.sites)]
        return [*resolved, UNKNOWN_SITE]

    @cached_property
    def _functions(self) -> tuple[list[str], np.ndarray]:
        return _sorted_ids(self.site_names)

    @property
    def function_names(self) -> list[str]:
        """Distinct traced function names, sorted (index = function id)."""
        return self._functions[0]

    @property
    def function_of_site(self) -> np.ndarray:
        """Per site position (plus the unknown slot): its function id."""
        return self._functions[1]

    @cached_property
    def function_of_site_id(self) -> np.ndarray:
        """Site id -> function id, one lookup (ids past its end: the last entry, unknown)."""
        return self.function_of_site.take(self._site_lookup)

    def functions(self, records: np.ndarray) -> np.ndarray:
        """Per record: its function id."""
        return self.function_of_site.take(self.site_position(records["site"]))

    @cached_property
    def callee_address(self) -> np.ndarray:
        """Per site position (plus the unknown slot): the traced function's address
        (fentry: the function holding the site; call: the callee; 0 if unknown)."""
        out = np.zeros(len(self.sites) + 1, dtype=np.uint64)
        for i, site in enumerate(self.sites):
            if site.kind == "fentry":
                out[i] = site.address  # the entry of the function it is in
            elif site.target is not None:
                out[i] = site.target
        return out

    # -- callers -----------------------------------------------------------------------

    def caller_ids(self, addresses: np.ndarray) -> np.ndarray:
        """Per record: a stable id of its caller address; new ones symbolized in bulk."""
        ids = self.callers.ids(addresses)
        if len(self._caller_names) < len(self.callers):
            new = np.array(self.callers.values[len(self._caller_names):], dtype=np.uint64)
            self._caller_names += self.recording.symbolize(new)
        return ids

    @property
    def caller_names(self) -> list[str]:
        """Symbolized caller per caller id (ids from :meth:`caller_ids`)."""
        return self._caller_names

    # -- threads -------------------------------------------------------------------------

    @cached_property
    def _opaque_threads(self) -> bool:
        """Thread ids are the low half of each thread's pointer (no glibc tid to read:
        a static or non-glibc program): numbers that mean nothing to a reader."""
        return str(self.recording.metadata.get("thread_ids", "")).startswith("thread pointer")

    def thread_label(self, tid: int) -> str:
        """``name-tid`` as ftrace shows a task: the thread's own name if the capture
        learned it, else the program's. Opaque thread ids are shown as ``name-tN``,
        N counting the threads in the order they first appear."""
        info = self.recording.threads.get(tid)
        name = info.name if info is not None and info.name != "?" else comm_of(self.recording.command)
        if self._opaque_threads:
            number = self._opaque_numbers.setdefault(tid, len(self._opaque_numbers) + 1)
            return f"{name[:_COMM_LEN]}-t{number}"
        return f"{name[:_COMM_LEN]}-{tid}"

    def process_of(self, tid: int) -> int:
        """The process a thread belongs to (a forked child's records carry its own pid)."""
        info = self.recording.threads.get(tid)
        return int(info.pid) if info is not None else int(self.recording.pid)

    # -- time --------------------------------------------------------------------------

    @cached_property
    def time_base_ns(self) -> int:
        """Times are shown since the recording started (or its first record, if earlier)."""
        start = int(self.recording.start_ns)
        first = first_timestamp(self.recording)
        return min(start, first) if first is not None else start


def recording_notes(recording: RecordingLike) -> tuple[str, ...]:
    """What a reader must know to trust the numbers: how the recording treated a full
    buffer, every loss by cause, and whether the file was cut short."""
    meta = recording.metadata
    notes = []
    if recording.cut:
        notes.append(f"CUT SHORT: {recording.cut}; what follows covers the records up to there")
    overflow = meta.get("overflow")
    if overflow == "wait":
        wakes = int(meta.get("writer_wakes") or 0)
        line = (f"lossless: a traced thread whose buffer was full waited for textpoke (at most "
                f"{float(meta.get('wait_s') or 0):g} s)")
        line += f"; threads were woken from such waits {wakes:,} times" if wakes else "; none had to"
        notes.append(line)
    elif overflow == "drop":
        notes.append("drop mode (--drop): traced threads never waited; a record that found its buffer "
                     "full was dropped and counted")
    causes = [(int(meta.get("lost_full") or 0), "found the buffer full"),
              (int(meta.get("lost_late") or 0), "were written after the end"),
              (int(meta.get("lost_unwritten") or 0), "could not be written to the file")]
    if recording.lost and any(n for n, _ in causes):
        notes.append("lost: " + ", ".join(f"{n:,} {why}" for n, why in causes if n))
    foreign = meta.get("foreign_sites") or []
    if foreign:
        shown = ", ".join(f"{a:#x}" for a in foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8
                                                              else "")
        notes.append(f"{len(foreign)} of {len(recording.sites)} sites hold someone else's int3 (a debugger's "
                     f"breakpoint or a uprobe) and were not traced: {shown}")
    return tuple(notes)


_T = TypeVar("_T")
_DONE = object()


def read_ahead(items: Iterable[_T], depth: int = 2) -> Iterator[_T]:
    """``items``, produced by a thread of their own up to ``depth`` ahead: a recording's
    next chunks are decompressed and prepared (zstd and numpy let go of the GIL) while
    the caller works on this one, on another core.  Errors come out where they
    happened; leaving early stops the thread (and waits for it).  Each item held
    ahead costs its memory: ``depth`` small, items of a bounded size."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(_DONE)
        except BaseException as exc:  # handed to the caller, raised there
            ready.put(exc)

    thread = threading.Thread(target=produce, name="textpoke-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # free a producer blocked on a full queue
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def first_timestamp(recording: RecordingLike) -> int | None:
    """The earliest record's time (chunks are in time order: the first chunk's first)."""
    for chunk in recording.chunks():
        if len(chunk):
            return int(chunk["ts_ns"][0])
    return None


def calls_only(records: np.ndarray) -> np.ndarray:
    """The records that count a call (entries, entry-only calls and call sites; not exits)."""
    kind = records["kind"]
    if not len(kind) or not kind.any():
        return records
    return records[(kind == CALL) | (kind == ENTER)]


def pair_counts(major: np.ndarray, minor: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ordered by major, then by count descending, then by minor (names are
    sorted ids, so ties go by name)."""
    order = np.lexsort((minor, -counts, major))
    return major[order], minor[order], counts[order]


def top_per_major(
    majors: np.ndarray, minors: np.ndarray, counts: np.ndarray, *, n_major: int, k: int
) -> list[tuple[list[tuple[int, int]], int]]:
    """For each major id: its ``k`` most frequent (minor, count) and how many distinct minors it has."""
    bounds = np.searchsorted(majors, np.arange(n_major + 1))
    minors_l, counts_l = minors.tolist(), counts.tolist()
    out = []
    for m in range(n_major):
        lo, hi = int(bounds[m]), int(bounds[m + 1])
        top = min(hi, lo + k)
        out.append((list(zip(minors_l[lo:top], counts_l[lo:top])), hi - lo))
    return out
