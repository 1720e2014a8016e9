"""``textpoke dump FILE``: every recorded call, as ftrace text, JSON Lines, Chrome trace JSON or folded stacks."""

from __future__ import annotations

import click

from ..report import DUMP_FORMATS, make_reporter
from ._capture import ProgressReading, load_recording, output_stream


@click.command("dump")
@click.argument("file", metavar="FILE")
@click.option("--format", "fmt", type=click.Choice(list(DUMP_FORMATS)), default="ftrace", show_default=True,
              help="ftrace: ftrace's function_graph layout (entries and exits, durations, nesting) or, for an "
                   "entry-only recording, its function-tracer layout (text is the same); json: JSON Lines (a header "
                   "object, then one object per record); chrome: Chrome Trace Event JSON for ui.perfetto.dev "
                   "(nested slices per thread); folded: folded stacks weighted by self time in nanoseconds, for "
                   "flamegraph.pl and speedscope.")
@click.option("-o", "--output", metavar="OUT", help="Write to OUT instead of stdout (as OUT.partial until whole).")
def command(file: str, fmt: str, output: str | None) -> None:
    """Print every call of a recording in time order (ftrace, json, chrome), or its
    call stacks with their self time (folded).  Streamed: any size.

    \b
    Example:
      textpoke dump run.tpk | less
      textpoke dump run.tpk --format chrome -o run.json   # open in ui.perfetto.dev
      textpoke dump run.tpk --format folded | flamegraph.pl > run.svg
    """
    reporter = make_reporter(fmt)
    with load_recording(file) as recording, output_stream(output) as out:
        reporter.render(ProgressReading(recording, "dumping"), out)
