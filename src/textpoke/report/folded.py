"""``textpoke dump --format folded``: folded stacks for flamegraph.pl and speedscope.

One line per call path with self time: ``main;parse;lex 1234``, the path from
the outermost traced function to the innermost, then the path's **self time in
nanoseconds** (time in the innermost function less the traced calls it made),
so a flame graph's widths are time and the frames' widths add up to the traced
time of their parents.  Threads are merged; a path without self time is left
out, as are entry-only calls (no time).  ``;`` inside a name (it would split
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
        paths = [""] * len(names)
        lines = []
        for node, _depth in tree.walk():
            up = tree.parent[node]
            paths[node] = names[node] if up <= 0 else f"{paths[up]};{names[node]}"
            own = tree.value("self", node)
            if own > 0:
                lines.append(f"{paths[node]} {own}\n")
        lines.sort()
        out.write("".join(lines))
