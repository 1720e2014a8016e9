"""``textpoke dump --format text``: one line per call, as ftrace's function tracer prints.

    # tracer: function (textpoke)
    ...
    #           TASK-PID     CPU#   TIMESTAMP  FUNCTION
    #              | |         |       |         |
              target-4242  [???]     0.000100: work_a <-main

TIMESTAMP is seconds since the recording started, to the microsecond (as
ftrace).  textpoke does not record the CPU, so that column is ``[???]``;
it is kept so that the columns line up where ftrace readers expect them.
TASK is the process's command name (15 characters, as the kernel keeps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from .._errors import UsageError
from ._chunks import chunks
from ._view import RecordingLike, RecordingView, comm_of, is_count_mode


def count_mode_refusal(what: str) -> UsageError:
    return UsageError(
        f"this recording was made with --count: it holds counts per function, not {what}",
        hint="use `textpoke report FILE` (or `textpoke dump --format json FILE` for the counts), "
        "or record again without --count",
    )


@dataclass(frozen=True)
class FtraceReporter:
    def render(self, recording: RecordingLike, out: TextIO) -> None:
        if is_count_mode(recording):
            raise count_mode_refusal("individual calls")
        view = RecordingView(recording)
        records = len(view.records)
        # ftrace reports overwritten events the same way: written = kept + lost.
        out.write(
            "# tracer: function (textpoke)\n"
            f"# pid {recording.pid}, command {recording.command}\n"
            "#\n"
            f"# entries-in-buffer/entries-written: {records}/{records + int(recording.lost)}\n"
            "#\n"
            "#           TASK-PID     CPU#   TIMESTAMP  FUNCTION\n"
            "#              | |         |       |         |\n"
        )
        comm = comm_of(recording.command)
        tasks: dict[int, str] = {}
        for chunk in chunks(view, function_text=view.function_names, caller_text=view.caller_names):
            lines = []
            for rel, tid, function, caller in zip(chunk.rel_ns, chunk.tid, chunk.function, chunk.caller):
                task = tasks.get(tid)
                if task is None:
                    task = tasks[tid] = f"{comm}-{tid}".rjust(16)
                us = rel // 1000
                lines.append(f"{task}  [???] {us // 1_000_000:5d}.{us % 1_000_000:06d}: {function} <-{caller}\n")
            out.write("".join(lines))
