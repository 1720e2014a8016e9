"""``textpoke dump --format ftrace``: the ftrace layout that fits the recording.

A function-graph recording (entries and exits) is laid out as ftrace's
function_graph tracer prints (see :mod:`.funcgraph`); an entry-only one as its
function tracer prints, one line per call (``--format text`` is the same)::

    # tracer: function (textpoke)
    ...
    #           TASK-PID     CPU#   TIMESTAMP  FUNCTION
    #              | |         |       |         |
              target-4242  [001]     0.000100: work_a <-main

TIMESTAMP is seconds since the recording started, to the microsecond (as
ftrace).  CPU is the CPU the record was written on (``[???]`` for a record of
the shared buffer threads without rseq use).  TASK is the thread's name as the
kernel keeps it (15 characters) when the capture could read it, else the
program's; PID is the thread id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from .._errors import UsageError
from ..ring.format import UNKNOWN_CPU
from ._chunks import chunks
from ._frames import is_graph_recording
from ._view import CALL, RecordingLike, RecordingView, is_count_mode, recording_notes
from .funcgraph import FunctionGraphReporter


def count_mode_refusal(what: str) -> UsageError:
    return UsageError(
        f"this recording was made with --count: it holds counts per function, not {what}",
        hint="use `textpoke report FILE` (or `textpoke dump --format json FILE` for the counts), "
        "or record again without --count",
    )


def cpu_text(cpu: int) -> str:
    return "???" if cpu == UNKNOWN_CPU else f"{cpu:03d}"


@dataclass(frozen=True)
class FtraceReporter:
    def render(self, recording: RecordingLike, out: TextIO) -> None:
        if is_count_mode(recording):
            raise count_mode_refusal("individual calls")
        if is_graph_recording(recording):
            FunctionGraphReporter().render(recording, out)
            return
        view = RecordingView(recording)
        records = recording.record_count
        # ftrace reports overwritten events the same way: written = kept + lost.
        out.write(
            "# tracer: function (textpoke)\n"
            f"# pid {recording.pid}, command {recording.command}\n"
            + "".join(f"# {note}\n" for note in recording_notes(recording))
            + "#\n"
            f"# entries-in-buffer/entries-written: {records}/{records + int(recording.lost)}\n"
            "#\n"
            "#           TASK-PID     CPU#   TIMESTAMP  FUNCTION\n"
            "#              | |         |       |         |\n"
        )
        tasks: dict[int, str] = {}
        for chunk in chunks(view):
            lines = []
            for rel, tid, cpu, kind, function, caller in zip(chunk.rel_ns, chunk.tid, chunk.cpu, chunk.kind,
                                                             chunk.function, chunk.caller):
                if kind != CALL:
                    continue
                task = tasks.get(tid)
                if task is None:
                    task = tasks[tid] = view.thread_label(tid).rjust(16)
                us = rel // 1000
                lines.append(f"{task}  [{cpu_text(cpu)}] {us // 1_000_000:5d}.{us % 1_000_000:06d}: "
                             f"{function} <-{caller}\n")
            out.write("".join(lines))
