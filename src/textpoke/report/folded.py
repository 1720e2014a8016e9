"""``textpoke dump --format folded``: folded stacks for flamegraph.pl and speedscope.

One line per call path with self time: ``main;parse;lex 1234``, the path from
the outermost traced function to the innermost, then the path's **self time in
nanoseconds** (time in the innermost function less the traced calls it made),
so a flame graph's widths are time and the frames' widths add up to the traced
time of their parents.  Threads are merged; a path without self time is left
out, as are entry-only calls (no time).  Lines come depth first, the paths with
most time first (flamegraph.pl sorts them itself; speedscope needs no order).  ``;`` inside a name (it would split
the path) is written ``:``.  Frames cut off by the end count up to the end of
the recording, unwound ones up to when the tracer saw them gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from ._paths import PathTimes
from .graph import check_graph_recording
from ._view import RecordingLike


@dataclass(frozen=True)
class FoldedReporter:
    def render(self, recording: RecordingLike, out: TextIO) -> None:
        check_graph_recording(recording, "stacks with times")
        tree, _ = PathTimes(recording).collect().tree()
        names = [label.replace(";", ":").replace("\n", " ") for label in tree.label]
        # Depth first, most time first; the path is joined per line, never kept per
        # node (a path 10,000 calls deep would otherwise be held 10,000 times).
        stack: list[str] = []
        lines: list[str] = []
        for node, depth in tree.walk():
            del stack[depth - 1:]
            stack.append(names[node])
            own = tree.value("self", node)
            if own > 0:
                lines.append(f"{';'.join(stack)} {own}\n")
            if len(lines) >= 4096:
                out.write("".join(lines))
                lines.clear()
        out.write("".join(lines))
