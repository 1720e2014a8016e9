"""``textpoke report FILE``: calls per function, top callers and threads of a recording."""

from __future__ import annotations

import click

from ..report import SortKey, SummaryReporter
from ._capture import load_recording, output_stream


@click.command("report")
@click.argument("file", metavar="FILE")
@click.option("--sort", type=click.Choice([k.value for k in SortKey]), default=SortKey.CALLS.value,
              show_default=True, help="calls: most called first; name: alphabetical.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Show only the first N functions.")
def command(file: str, sort: str, limit: int | None) -> None:
    """Summarize a recording: per function its calls, calls/s, share, top callers and threads.

    Works for --count recordings too (calls only).  Lost records, if any, are
    shown in the header: the counts are then lower bounds.
    """
    recording = load_recording(file)
    with output_stream(None) as out:
        SummaryReporter(sort=SortKey(sort), limit=limit).render(recording, out)
