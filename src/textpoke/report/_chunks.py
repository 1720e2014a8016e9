"""Streaming a large recording out as text, a slice of records at a time.

Per-record text cannot be produced by numpy alone, but everything *except*
the final string formatting can: each chunk's columns are computed with numpy
and turned into Python lists in one call each, and the lines of a chunk are
written with one ``out.write``.  Memory stays bounded by the chunk size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ._view import RecordingView

CHUNK = 1 << 16


@dataclass(frozen=True)
class Chunk:
    """Python-list columns of records ``[lo, hi)`` (ready for string formatting)."""

    rel_ns: list[int]  # since the recording's time base
    tid: list[int]
    function: list[str]  # already through ``function_text``
    caller: list[str]  # already through ``caller_text``
    site: list[int]
    caller_address: list[int]
    callee_address: list[int]
    arg0: list[int] | None  # None when the recording's records have no arg0 field


def chunks(view: RecordingView, *, function_text: list[str], caller_text: list[str]) -> Iterator[Chunk]:
    """Walk ``view``'s records in order; names are looked up by id in the given
    per-id texts (so a reporter can pre-escape each distinct name once)."""
    functions = np.array(function_text, dtype=object)
    callers = np.array(caller_text, dtype=object)
    records = view.records
    has_arg0 = "arg0" in (records.dtype.names or ())
    for lo in range(0, len(records), CHUNK):
        hi = min(lo + CHUNK, len(records))
        part = records[lo:hi]
        yield Chunk(
            rel_ns=view.relative_ns(lo, hi).tolist(),
            tid=part["tid"].tolist(),
            function=functions[view.function[lo:hi]].tolist(),
            caller=callers[view.caller[lo:hi]].tolist(),
            site=part["site"].tolist(),
            caller_address=part["caller"].tolist(),
            callee_address=part["callee"].tolist(),
            arg0=part["arg0"].tolist() if has_arg0 else None,
        )
