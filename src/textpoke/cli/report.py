"""``textpoke report FILE``: calls per function, top callers and threads of a recording."""

from __future__ import annotations

import click

from ..report import SortKey, SummaryReporter
from ._capture import ProgressReading, load_recording, output_stream


@click.command("report")
@click.argument("file", metavar="FILE")
@click.option("--sort", type=click.Choice([k.value for k in SortKey]), default=SortKey.CALLS.value,
              show_default=True, help="calls: most called first; name: alphabetical.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Show only the first N functions.")
def command(file: str, sort: str, limit: int | None) -> None:
    """Summarize a recording: per function its calls, calls/s, share, top callers and threads.

    Works for --count recordings too (calls only), and for recordings larger
    than memory (read chunk by chunk).  Lost records, if any, are shown in the
    header with their causes: the counts are then lower bounds.  A recording
    cut short (textpoke killed, disk full) is read up to its last whole chunk,
    and the header says so.
    """
    with load_recording(file) as recording, output_stream(None) as out:
        SummaryReporter(sort=SortKey(sort), limit=limit).render(ProgressReading(recording, "reading"), out)
