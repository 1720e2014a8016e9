"""``textpoke graph FILE``: the call tree of a recording, per call path, with times."""

from __future__ import annotations

import click

from ..report import GraphReporter
from ._capture import ProgressReading, load_recording, output_stream


@click.command("graph")
@click.argument("file", metavar="FILE")
@click.option("-F", "--function", metavar="FUNC",
              help="Root the tree at FUNC: every call path through it, merged at it, and the paths leading to it.")
@click.option("--threads", is_flag=True, help="A tree per thread (default: threads merged).")
@click.option("--depth", type=click.IntRange(min=1), metavar="N", help="Show N levels of calls at most.")
@click.option("-o", "--output", metavar="OUT", help="Write to OUT instead of stdout (as OUT.partial until whole).")
def command(file: str, function: str | None, threads: bool, depth: int | None, output: str | None) -> None:
    """Show the call tree: per call path, total time, self time and calls (like `uftrace graph`).

    Needs a recording with function exits.  A function reached through two
    different paths is on two lines.  Frames that did not end with a return are
    marked on their line (unwound, cut off by the end); entry-only calls are
    counted without time.

    \b
    Example:
      textpoke graph run.tpk
      textpoke graph run.tpk -F parse      # who calls parse, and what parse calls
    """
    with load_recording(file) as recording, output_stream(output) as out:
        GraphReporter(function=function, threads=threads, depth=depth).render(
            ProgressReading(recording, "reading"), out)
