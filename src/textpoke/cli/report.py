"""``textpoke report FILE``: where the calls (and, with exits recorded, the time) of a recording go."""

from __future__ import annotations

import click

from ..report import FlameReporter, TimeKey, summary_reporter
from ._capture import ProgressReading, load_recording, output_stream


@click.command("report")
@click.argument("file", metavar="FILE")
@click.option("--sort", type=click.Choice([k.value for k in TimeKey]), default=None,
              help="Order of the rows: total (the default with times), self, avg, min, max, calls (the default "
                   "without), name.  Numbers sort largest first.")
@click.option("--threads", is_flag=True, help="A row per thread and function (rows grouped by thread).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Show only the first N rows (per thread with --threads).")
@click.option("--html", "html_out", metavar="OUT.html",
              help="Write the report as one self-contained HTML page instead: a flame graph of the call paths "
                   "(hover for times, click to zoom) above the table.  Needs exits (a function-graph recording).")
def command(file: str, sort: str | None, threads: bool, limit: int | None, html_out: str | None) -> None:
    """Summarize a recording, per function.

    \b
    With exits recorded (function-graph recordings): calls, total time, self
    time (less the traced calls it made), average, min and max duration of one
    call.  Recursion counts once in total.  The header says how many frames were
    unwound, cut off by the end or the start of the recording, or entry-only,
    and rows carry the same notes: their times are bounds, not exact.
    Entry-only recordings: calls, calls/s, share, top callers and threads.

    Works for --count recordings too (calls only), and for recordings larger
    than memory (read chunk by chunk).  Lost records, if any, are shown in the
    header with their causes: the counts are then lower bounds.  A recording
    cut short (textpoke killed, disk full) is read up to its last whole chunk,
    and the header says so.

    \b
    Example:
      textpoke report run.tpk --sort self --limit 20
      textpoke report run.tpk --html run.html     # open it in any browser, offline
    """
    with load_recording(file) as recording:
        reading = ProgressReading(recording, "reading")
        if html_out is not None:
            with output_stream(html_out) as out:
                FlameReporter(sort=TimeKey(sort or TimeKey.TOTAL)).render(reading, out)
            return
        reporter = summary_reporter(reading, sort=sort, threads=threads, limit=limit)
        with output_stream(None) as out:
            reporter.render(reading, out)
