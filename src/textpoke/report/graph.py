"""``textpoke graph FILE``: the call tree, aggregated per call path, with times.

Like ``uftrace graph``: each line is one distinct call path (the same function
reached from two callers is two lines), with the total time of its calls, their
self time (less the traced calls they made) and how many calls there were.
Threads are merged (``threads`` keeps a tree per thread).  Rooted at a
function (``-F FUNC``), every path through it is merged at it, and the distinct
paths that reach it are listed first with their calls and time.

Frames not ended by a return are marked on their line: unwound (timed to when
the tracer saw them gone), cut off by the end (timed to the recording's end),
entry-only calls (counted, no time).  Exits without an entry (running when the
recording began) have no path: the header counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from .._errors import UsageError
from ._frames import is_graph_recording
from ._paths import PathTimes, Tree
from ._text import columns, duration_text, frame_lines, plural, recording_head, site_kinds
from ._view import RecordingLike, recording_notes


def no_exits_refusal(what: str) -> UsageError:
    return UsageError(
        f"this recording has no function exits (entry-only), so it has no {what}",
        hint="record again with exits (the default for fentry sites); `textpoke report FILE` counts its calls",
    )


def check_graph_recording(recording: RecordingLike, what: str) -> None:
    if recording.counts is not None:
        raise UsageError(f"this recording was made with --count: it holds counts per function, not {what}",
                         hint="record again without --count")
    if not is_graph_recording(recording):
        raise no_exits_refusal(what)


def unknown_function(name: str, names: list[str]) -> UsageError:
    close = [n for n in names if name.lower() in n.lower()][:5]
    hint = (f"did you mean: {', '.join(close)}?" if close
            else "`textpoke report FILE --sort name` lists the traced functions")
    return UsageError(f"no traced function named {name!r} in this recording", hint=hint)


def node_notes(tree: Tree, node: int) -> str:
    parts = [(tree.value("unwound", node), "unwound"), (tree.value("cut_end", node), "cut off by the end"),
             (tree.value("entry_only", node), "entry-only")]
    text = ", ".join(f"{n:,} {what}" for n, what in parts if n)
    return f"  ({text})" if text else ""


def tree_lines(tree: Tree, *, depth: int | None = None) -> list[str]:
    """The tree as aligned rows: total, self, calls, then the path drawn with ASCII."""
    rows: list[tuple[str, ...]] = []
    # (node, prefix of its children's lines, its own branch)
    stack: list[tuple[int, str, str]] = []
    top = tree.ordered_children(0)
    stack.extend((c, "", "") for c in reversed(top))
    levels: dict[int, int] = {c: 1 for c in top}
    while stack:
        node, prefix, branch = stack.pop()
        frames = tree.value("frames", node)
        if node in tree.threads:
            rows.append((duration_text(tree.value("total", node)), "", "", f"thread {tree.label[node]}"))
        else:
            total = duration_text(tree.value("total", node)) if frames else "-"
            own = duration_text(tree.value("self", node)) if frames else "-"
            rows.append((total, own, f"{tree.value('calls', node):,}",
                         prefix + branch + tree.label[node] + node_notes(tree, node)))
        level = levels.pop(node)
        if depth is not None and level >= depth:
            continue
        kids = tree.ordered_children(node)
        below = prefix + ("" if not branch else ("|  " if branch == "+- " else "   "))
        for i, child in reversed(list(enumerate(kids))):
            levels[child] = level + 1
            stack.append((child, below, "`- " if i == len(kids) - 1 else "+- "))
    return columns(("total", "self", "calls", "call path"), rows, right=3) if rows else ["  no call was recorded"]


@dataclass(frozen=True)
class GraphReporter:
    """``textpoke graph``: the call tree with times (see the module docstring)."""

    function: str | None = None
    threads: bool = False
    depth: int | None = None

    def render(self, recording: RecordingLike, out: TextIO) -> None:
        check_graph_recording(recording, "call graph")
        times = PathTimes(recording)
        if self.function is not None and self.function not in times.view.function_names:
            raise unknown_function(self.function, times.view.function_names)
        times.collect()
        tree, backtraces = times.tree(threads=self.threads, function=self.function)
        records = times.frames.counts
        lines = recording_head(recording, records=recording.record_count, site_kinds=site_kinds(times.view))
        lines += recording_notes(recording)
        lines += frame_lines(records, recording.metadata)
        what = "threads apart" if self.threads else "threads merged"
        if self.function is None:
            lines += ["", f"call graph: time per call path ({what})"]
        else:
            lines += ["", f"call graph of {self.function}: every call path through it, merged at it ({what})"]
            verb = "leads" if len(backtraces) == 1 else "lead"
            lines.append(f"{plural(len(backtraces), 'call path')} {verb} to {self.function}:")
            lines += columns(("total", "calls", "path"),
                             [(duration_text(b.total_ns) if b.frames else "-", f"{b.calls:,}", " > ".join(b.path))
                              for b in backtraces], right=2) if backtraces else ["  it was never called"]
            lines.append("")
        lines += tree_lines(tree, depth=self.depth)
        out.write("\n".join(lines) + "\n")

