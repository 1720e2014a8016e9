"""report stage of textpoke (see DEVELOPERS.md): text, JSON and Chrome/Perfetto output.

Every output is a *reporter* with one method, ``render(recording, out)`` (the
memray shape), so the CLI picks one by name and writes to any text stream::

    reporter = make_reporter("chrome")
    with open("trace.json", "w") as out:
        reporter.render(recording, out)

Reporters read a recording in bulk with numpy (see ``_view``): a 10-million-record
recording summarizes in seconds; the per-call dumps stream in bounded chunks.
"""

from __future__ import annotations

from typing import Protocol, TextIO

from .._errors import UsageError
from ._view import RecordingLike
from .chrome import ChromeReporter
from .ftrace import FtraceReporter
from .jsonl import JsonLinesReporter
from .summary import Summary, SortKey, SummaryReporter, render_summary, summarize


class Reporter(Protocol):
    def render(self, recording: RecordingLike, out: TextIO) -> None: ...


#: ``textpoke dump --format NAME`` -> reporter class.
DUMP_FORMATS: dict[str, type[Reporter]] = {
    "text": FtraceReporter,
    "json": JsonLinesReporter,
    "chrome": ChromeReporter,
}


def make_reporter(name: str) -> Reporter:
    """The per-call reporter for a ``dump`` format name (``summary`` is :class:`SummaryReporter`)."""
    if name == "summary":
        return SummaryReporter()
    try:
        return DUMP_FORMATS[name]()
    except KeyError:
        raise UsageError(f"unknown report format {name!r}",
                         hint=f"choose one of: summary, {', '.join(DUMP_FORMATS)}") from None


__all__ = [
    "Reporter",
    "RecordingLike",
    "SummaryReporter",
    "FtraceReporter",
    "JsonLinesReporter",
    "ChromeReporter",
    "Summary",
    "SortKey",
    "summarize",
    "render_summary",
    "make_reporter",
    "DUMP_FORMATS",
]
