"""Streaming a recording out as text, a slice of records at a time.

Per-record text cannot be produced by numpy alone, but everything *except*
the final string formatting can: each slice's columns are computed with numpy
and turned into Python lists in one call each, and the lines of a slice are
written with one ``out.write``.  Memory stays bounded by the slice size,
whatever the recording's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ._view import RecordingView

CHUNK = 1 << 16


@dataclass(frozen=True)
class Chunk:
    """Python-list columns of one slice of records (ready for string formatting)."""

    rel_ns: list[int]  # since the recording's time base
    tid: list[int]
    cpu: list[int]
    kind: list[int]
    function: list[str]  # already through ``function_text``
    caller: list[str]  # already through ``caller_text``
    site: list[int]
    caller_address: list[int]
    callee_address: list[int]
    arg0: list[int]


class _Texts:
    """Per-id texts (escaped once per distinct name), growing as new ids appear."""

    def __init__(self, names: list[str], text: Callable[[str], str]) -> None:
        self.names = names
        self.text = text
        self.texts = np.empty(0, dtype=object)

    def take(self, ids: np.ndarray) -> list[str]:
        if len(self.texts) < len(self.names):
            self.texts = np.append(self.texts, np.array([self.text(n) for n in self.names[len(self.texts):]],
                                                       dtype=object))
        return self.texts.take(ids).tolist()


def chunks(view: RecordingView, *, text: Callable[[str], str] = str) -> Iterator[Chunk]:
    """Walk the recording's records in order, in slices; function and caller names
    go through ``text`` once per distinct name (a reporter's escaping)."""
    functions = _Texts(view.function_names, text)
    callers = _Texts(view.caller_names, text)
    base = np.int64(view.time_base_ns)
    for records in view.recording.chunks():
        for lo in range(0, len(records), CHUNK):
            part = records[lo : lo + CHUNK]
            positions = view.site_position(part["site"])
            caller_ids = view.caller_ids(part["caller"])
            callers.names = view.caller_names
            yield Chunk(
                rel_ns=(part["ts_ns"].astype(np.int64) - base).tolist(),
                tid=part["tid"].tolist(),
                cpu=part["cpu"].tolist(),
                kind=part["kind"].tolist(),
                function=functions.take(view.function_of_site.take(positions)),
                caller=callers.take(caller_ids),
                site=part["site"].tolist(),
                caller_address=part["caller"].tolist(),
                callee_address=view.callee_address.take(positions).tolist(),
                arg0=part["arg0"].tolist(),
            )
