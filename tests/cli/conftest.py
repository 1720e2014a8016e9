"""Synthetic recordings (real :class:`textpoke.ring.Recording` objects) for the report / CLI tests."""

from __future__ import annotations

import numpy as np
import pytest

from textpoke.ring import RECORD_DTYPE, Recording, SiteInfo, Symbols
from textpoke.ring.format import UNKNOWN_CPU

#: (start, end, name): what the capture engine stores to symbolize callers.
FUNCTIONS = ((0x401000, 0x401100, "main"), (0x401100, 0x401200, "helper"),
             (0x401200, 0x401300, "work_a"), (0x401300, 0x401400, "work_b"))
SITES = (
    SiteInfo(0, 0x401200, "fentry", "work_a", None),
    SiteInfo(1, 0x401300, "fentry", "work_b", None),
    SiteInfo(2, 0x401050, "call", "main", "work_c", 0x401400),
    SiteInfo(3, 0x401310, "fentry", "never", None),
)


def records(rows: list[tuple[int, ...]]) -> np.ndarray:
    """Records from (ts_ns, tid, site, caller[, cpu]) rows (other fields zero)."""
    out = np.zeros(len(rows), dtype=RECORD_DTYPE)
    for name, column in zip(("ts_ns", "tid", "site", "caller", "cpu"), zip(*rows) if rows else [()] * 5):
        out[name] = column
    return out


def tiny_recording(**changes) -> Recording:
    """Five calls on two threads: work_a 3x (main 2, helper 1), work_b 1x, work_c 1x
    through a call site in main; `never` is traced but not called."""
    recording = Recording(
        records=records([
            (1_000_000_100, 4242, 0, 0x401020, 0),
            (1_000_100_000, 4242, 0, 0x401030, 0),
            (1_000_200_500, 4243, 1, 0x401110, 1),
            (1_500_000_000, 4243, 0, 0x401120, 1),
            (2_000_000_999, 4242, 2, 0x401050, UNKNOWN_CPU),
        ]),
        sites=SITES,
        lost=0,
        pid=4242,
        command="./target 3",
        start_ns=1_000_000_000,
        end_ns=3_000_000_000,
        symbols=Symbols.from_ranges(FUNCTIONS),
    )
    if changes.get("counts") is not None:
        changes.setdefault("mode", "count")
    return replaced(recording, **changes)


def replaced(recording: Recording, **changes) -> Recording:
    """A copy of an in-memory recording with some fields changed."""
    fields = {name: getattr(recording, name) for name in
              ("records", "sites", "lost", "pid", "command", "start_ns", "end_ns", "symbols", "counts", "mode",
               "metadata", "threads", "cut")}
    fields.update(changes)
    return Recording(**fields)


def count_recording(counts: list[int]) -> Recording:
    return tiny_recording(records=records([]), counts=np.array(counts, dtype=np.uint64))


@pytest.fixture
def tiny() -> Recording:
    return tiny_recording()
