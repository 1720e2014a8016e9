"""``textpoke dump --format ftrace`` of a function-graph recording: ftrace's function_graph layout.

As the kernel prints it with the ``funcgraph-abstime``, ``funcgraph-proc`` and
``funcgraph-tail`` options::

    #     TIME        CPU  TASK/PID         DURATION                  FUNCTION CALLS
    #      |          |     |    |           |   |                     |   |   |   |
        0.000100 |    0)  target-4242   |               |  main() {
        0.000120 |    0)  target-4242   |   0.300 us    |    work();
        0.000900 |    0)  target-4242   |   0.800 us    |  } /* main */

TIME is seconds since the recording started; CPU the CPU whose buffer took the
record (``???``: the shared buffer); DURATION the frame's time, with ftrace's
marks for long ones (``+`` over 10 us, ``!`` 100 us, ``#`` 1 ms, ``*`` 10 ms,
``@`` 100 ms, ``$`` 1 s).  A call whose exit is its thread's very next record
is one leaf line ``work();``, as in ftrace (the dump streams a chunk of the
file at a time and looks one chunk ahead: an exit further away than that, in a
thread silent for a whole chunk, shows as ``work() {`` and ``}``).  Lines are in time order, threads
interleaved; each thread is indented by its own depth, and a CPU that switches
threads gets ftrace's ``=>`` marker.  How a frame ended, when not by a return,
is said in its closing line's comment; entry-only calls are ``f(); /* entry only */``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from ..ring.format import UNKNOWN_CPU
from ._frames import CALL, CUT, ENTER, EXIT, RESYNC, UNWOUND, FramePass
from ._text import frame_lines
from ._view import RecordingLike, RecordingView, recording_notes

#: (above this many ns, mark) from the longest; ftrace's duration marks.
_MARKS = ((1_000_000_000, "$"), (100_000_000, "@"), (10_000_000, "*"), (1_000_000, "#"), (100_000, "!"),
          (10_000, "+"))
_PROC_WIDTH = 14  # ftrace centres "comm-pid" in this many columns
_NO_DURATION = " " * 14 + "|  "
_SEPARATOR = " ------------------------------------------\n"


def duration_cell(ns: int) -> str:
    """The DURATION column: mark, microseconds with at most 7 digits, `` us``, padded."""
    mark = next((m for limit, m in _MARKS if ns > limit), " ")
    usecs, nsecs = divmod(ns, 1000)
    text = str(usecs)
    if len(text) < 7:
        text += "." + f"{nsecs:03d}"[: 7 - len(text)]
    return f"{mark} {text} us ".ljust(14) + "|  "


def proc_cell(label: str) -> str:
    spaces = max(0, _PROC_WIDTH - len(label))
    return " " * (spaces // 2) + label + " " * (spaces - spaces // 2)


def cpu_cell(cpu: int) -> str:
    return "???" if cpu == UNKNOWN_CPU else f"{cpu:>3}"


HEADER = ("#     TIME        CPU  TASK/PID         DURATION                  FUNCTION CALLS\n"
          "#      |          |     |    |           |   |                     |   |   |   |\n")


@dataclass(frozen=True)
class FunctionGraphReporter:
    def render(self, recording: RecordingLike, out: TextIO) -> None:
        view = RecordingView(recording)
        frames = FramePass(view, leaves=True)
        names = view.function_names
        base = view.time_base_ns
        out.write("# tracer: function_graph (textpoke)\n"
                  f"# pid {recording.pid}, command {recording.command}\n"
                  + "".join(f"# {note}\n" for note in recording_notes(recording))
                  + "#\n" + HEADER)
        tasks: dict[int, str] = {}
        on_cpu: dict[int, str] = {}
        for chunk in frames.chunks():
            lines: list[str] = []
            rec = chunk.records
            assert chunk.leaf is not None and chunk.folded is not None
            for ts, tid, cpu, kind, fn, indent, dur, leaf, folded, orphan in zip(
                    (rec["ts_ns"].astype("i8") - base).tolist(), rec["tid"].tolist(), rec["cpu"].tolist(),
                    rec["kind"].tolist(), chunk.function.tolist(), chunk.indent.tolist(), chunk.duration.tolist(),
                    chunk.leaf.tolist(), chunk.folded.tolist(), chunk.orphan.tolist()):
                if folded:
                    continue
                task = tasks.get(tid)
                if task is None:
                    task = tasks[tid] = proc_cell(view.thread_label(tid))
                if cpu != UNKNOWN_CPU:
                    before = on_cpu.get(cpu)
                    if before != task:
                        if before is not None:
                            lines.append(f"{_SEPARATOR} {cpu_cell(cpu)})  {before.strip()}  =>  {task.strip()}\n"
                                         f"{_SEPARATOR}")
                        on_cpu[cpu] = task
                name = names[fn]
                if kind == ENTER:
                    text, cell = (f"{name}();", duration_cell(dur)) if leaf else (f"{name}() {{", _NO_DURATION)
                elif kind == CALL:
                    text, cell = f"{name}(); /* entry only */", _NO_DURATION
                elif orphan:
                    text, cell = f"}} /* {name}: entered before the recording */", _NO_DURATION
                elif kind == EXIT:
                    text, cell = f"}} /* {name} */", duration_cell(dur)
                elif kind == UNWOUND:
                    text, cell = f"}} /* {name}: unwound, no return */", duration_cell(dur)
                elif kind == CUT:
                    text, cell = f"}} /* {name}: cut off by the end of the recording */", duration_cell(dur)
                elif kind == RESYNC:
                    text, cell = f"}} /* {name}: no exit recorded (resynchronized) */", duration_cell(dur)
                else:
                    text, cell = f"/* {name}: a record that matches no open frame, ignored */", _NO_DURATION
                us = ts // 1000
                lines.append(f"{us // 1_000_000:5d}.{us % 1_000_000:06d} |  {cpu_cell(cpu)})  {task} | {cell}"
                             f"{'  ' * indent}{text}\n")
            out.write("".join(lines))
        # How frames ended is known only once every record was read: it closes the file.
        out.write("#\n" + "".join(f"# {line}\n" for line in frame_lines(frames.counts, recording.metadata)))
