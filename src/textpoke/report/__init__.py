"""report stage of textpoke (see DEVELOPERS.md): what a recording says, as text, JSON, HTML.

Every output is a *reporter* with one method, ``render(recording, out)`` (the
memray shape), so the CLI picks one by name and writes to any text stream::

    reporter = make_reporter("chrome")
    with open("trace.json", "w") as out:
        reporter.render(recording, out)

Modules, one per output:

- ``summary``: ``textpoke report`` of an entry-only recording (calls, callers, threads);
- ``timed``: ``textpoke report`` of a function-graph recording (total, self, avg, min, max);
- ``graph``: ``textpoke graph``, the call tree per call path with times;
- ``ftrace`` / ``funcgraph``: ftrace's function and function_graph text layouts;
- ``chrome``: Chrome Trace Event JSON (instants, or nested slices per thread);
- ``jsonl``: JSON Lines, one object per record;
- ``folded``: folded stacks weighted by self time (flamegraph.pl, speedscope);
- ``flame``: the self-contained HTML page (flame graph and table).

They share ``_view`` (names, ids and thread labels in bulk), ``_frames`` (the
one vectorized pass that pairs entries with exits, chunk by chunk), ``_paths``
(time per call path) and ``_text``.  Every reporter streams: a recording far
larger than memory is read one chunk at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TextIO

from .._errors import UsageError
from .._lazy import lazy_attributes
from ._frames import FrameCounts, FramePass, is_graph_recording
from ._view import RecordingLike
from .summary import Summary, SortKey, SummaryReporter, render_summary, summarize
from .timed import TimedReporter, TimedSummary, TimeKey, summarize_times

if TYPE_CHECKING:
    from .chrome import ChromeReporter
    from .flame import FlameReporter
    from .folded import FoldedReporter
    from .ftrace import FtraceReporter
    from .funcgraph import FunctionGraphReporter
    from .graph import GraphReporter
    from .jsonl import JsonLinesReporter

#: Reporters loaded when first named: the summary that ``trace`` and ``record`` print
#: needs none of them (their modules cost a capture ~35 ms of start-up).
_LAZY = {
    "ChromeReporter": "chrome",
    "FlameReporter": "flame",
    "FoldedReporter": "folded",
    "FtraceReporter": "ftrace",
    "FunctionGraphReporter": "funcgraph",
    "GraphReporter": "graph",
    "JsonLinesReporter": "jsonl",
}


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


class Reporter(Protocol):
    def render(self, recording: RecordingLike, out: TextIO) -> None: ...


#: ``textpoke dump --format NAME`` -> the reporter class's name (loaded when chosen).
DUMP_FORMATS: dict[str, str] = {
    "ftrace": "FtraceReporter",
    "text": "FtraceReporter",  # the name ftrace's layout had before function graphs
    "json": "JsonLinesReporter",
    "chrome": "ChromeReporter",
    "folded": "FoldedReporter",
}


#: ``--sort`` keys that make sense without times (an entry-only recording).
ENTRY_ONLY_SORTS = frozenset(k.value for k in SortKey)


def summary_reporter(recording: RecordingLike, *, sort: str | None = None, threads: bool = False,
                     limit: int | None = None) -> Reporter:
    """What ``textpoke report`` (and ``trace`` without -o) prints for ``recording``:
    times per function when it has exits, else calls, callers and threads."""
    if recording.counts is None and is_graph_recording(recording):
        return TimedReporter(sort=TimeKey(sort or TimeKey.TOTAL), threads=threads, limit=limit)
    if sort is not None and sort not in ENTRY_ONLY_SORTS:
        raise UsageError(f"--sort {sort} needs times, and this recording has no function exits",
                         hint="sort by calls or name (or record with exits)")
    return SummaryReporter(sort=SortKey(sort or SortKey.CALLS), limit=limit, threads=threads)


def make_reporter(name: str) -> Reporter:
    """The reporter for a ``dump`` format name (``summary`` is :class:`SummaryReporter`)."""
    if name == "summary":
        return SummaryReporter()
    try:
        return __getattr__(DUMP_FORMATS[name])()
    except KeyError:
        raise UsageError(f"unknown report format {name!r}",
                         hint=f"choose one of: summary, {', '.join(DUMP_FORMATS)}") from None


__all__ = [
    "ENTRY_ONLY_SORTS",
    "summary_reporter",
    "ChromeReporter",
    "DUMP_FORMATS",
    "FlameReporter",
    "FoldedReporter",
    "FrameCounts",
    "FramePass",
    "FtraceReporter",
    "FunctionGraphReporter",
    "GraphReporter",
    "JsonLinesReporter",
    "RecordingLike",
    "Reporter",
    "SortKey",
    "Summary",
    "SummaryReporter",
    "TimeKey",
    "TimedReporter",
    "TimedSummary",
    "is_graph_recording",
    "make_reporter",
    "render_summary",
    "summarize",
    "summarize_times",
]
