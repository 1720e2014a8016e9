"""Bulk decoding shared by every reporter: records -> function / caller / thread ids.

A recording can hold tens of millions of records, so nothing here loops over
records in Python: each per-record column is derived with numpy (a lookup table
from site id to function; :func:`group` for callers and threads, a dense table or
``np.unique``), and only the *distinct* values (sites, caller addresses, threads)
are touched one by one, e.g. to symbolize them.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np


class SiteLike(Protocol):
    id: int
    address: int
    kind: str
    function: str
    target_name: str | None


class RecordingLike(Protocol):
    """What the reporters read from a ``textpoke.ring.recording.Recording``."""

    records: np.ndarray
    sites: tuple[SiteLike, ...]
    lost: int
    pid: int
    command: str
    start_ns: int
    end_ns: int
    counts: np.ndarray | None

    def symbolize(self, addresses: np.ndarray) -> list[str]: ...


#: The name given to records whose site id is not in the recording's site table
#: (a damaged file); they are still counted, never dropped.
UNKNOWN_SITE = "<unknown site>"
#: Linux keeps 15 characters of a thread's name (TASK_COMM_LEN - 1); ftrace shows that.
_COMM_LEN = 15


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


class RecordingView:
    """Per-record function / caller / thread ids of one recording, computed lazily."""

    def __init__(self, recording: RecordingLike) -> None:
        self.recording = recording
        self.records = recording.records
        self.sites = tuple(recording.sites)

    # -- sites and functions ---------------------------------------------------------

    @cached_property
    def site_position(self) -> np.ndarray:
        """Per record: the position of its site in ``sites`` (``len(sites)`` if unknown)."""
        n = len(self.sites)
        ids = np.fromiter((int(s.id) for s in self.sites), dtype=np.int64, count=n)
        site_col = self.records["site"].astype(np.int64, copy=False)
        top = max(int(ids.max()) if n else -1, int(site_col.max()) if len(site_col) else -1)
        lookup = np.full(top + 2, n, dtype=np.int64)  # unknown ids map to the extra slot n
        lookup[ids] = np.arange(n, dtype=np.int64)
        return lookup[site_col]

    @cached_property
    def site_names(self) -> list[str]:
        """Per site position (plus the unknown slot): the name of the function it traces.

        An fentry site traces the function it is in; a call/jmp site traces its
        callee, named by the site table or, failing that, by symbolizing the
        callee address of the first record that went through it."""
        names: list[str | None] = []
        for site in self.sites:
            if site.kind == "fentry":
                names.append(site.function)
            else:
                names.append(site.target_name)
        missing = [i for i, name in enumerate(names) if name is None]
        if missing and len(self.records):
            positions, first = np.unique(self.site_position, return_index=True)
            first_of = dict(zip(positions.tolist(), first.tolist()))
            found = [i for i in missing if i in first_of]
            callees = self.records["callee"][[first_of[i] for i in found]]
            for i, name in zip(found, self.recording.symbolize(np.asarray(callees, dtype=np.uint64))):
                names[i] = name
        resolved = [
            name if name is not None else f"<{site.kind} site {site.address:#x}>"
            for name, site in zip(names, self.sites)
        ]
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
    def function(self) -> np.ndarray:
        """Per record: its function id."""
        return self.function_of_site[self.site_position]

    # -- callers and threads ---------------------------------------------------------

    @cached_property
    def _caller_groups(self) -> Grouped:
        return group(self.records["caller"])

    @cached_property
    def _callers(self) -> tuple[list[str], np.ndarray]:
        groups = self._caller_groups
        names = self.recording.symbolize(groups.values) if len(groups.values) else []
        distinct, of_address = _sorted_ids(names)
        return distinct, of_address[groups.inverse]

    @property
    def caller_names(self) -> list[str]:
        """Distinct symbolized callers, sorted (index = caller id)."""
        return self._callers[0]

    @property
    def caller(self) -> np.ndarray:
        """Per record: its caller id (different return addresses in one function share it)."""
        return self._callers[1]

    @cached_property
    def threads(self) -> Grouped:
        return group(self.records["tid"])

    # -- time --------------------------------------------------------------------------

    @cached_property
    def time_base_ns(self) -> int:
        """Times are shown since the recording started (or its first record, if earlier)."""
        start = int(self.recording.start_ns)
        if len(self.records):
            start = min(start, int(self.records["ts_ns"].min()))
        return start

    def relative_ns(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        ts = self.records["ts_ns"][lo:hi]
        return ts.astype(np.int64) - np.int64(self.time_base_ns)


def pair_counts(major: np.ndarray, minor: np.ndarray, n_minor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (major, minor) pairs and how often each occurs, ordered by major,
    then by count descending, then by minor (names are sorted, so ties go by name)."""
    if len(major) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    key = major.astype(np.int64) * np.int64(max(n_minor, 1)) + minor.astype(np.int64)
    top = int(key.max()) + 1
    if _dense(top, len(key)):  # a counting table beats sorting 10 M keys
        dense = np.bincount(key, minlength=top)
        keys = np.flatnonzero(dense)
        counts = dense[keys]
    else:
        keys, counts = np.unique(key, return_counts=True)
    majors, minors = np.divmod(keys, np.int64(max(n_minor, 1)))
    order = np.lexsort((minors, -counts, majors))
    return majors[order], minors[order], counts[order]


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
