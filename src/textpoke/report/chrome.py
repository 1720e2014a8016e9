"""``textpoke dump --format chrome``: Chrome Trace Event JSON (ui.perfetto.dev, chrome://tracing).

A function-graph recording becomes nested duration slices, one complete event
(``"ph":"X"`` with ``dur``) per frame on its thread's track, so Perfetto draws a
flame chart per thread.  ``args`` hold the caller, the first argument and, for
a return, the return value; a frame that did not end with a return says how in
``args.ended``: ``"unwound"`` (longjmp, exception, thread exit: drawn to when
the tracer saw it gone), ``"cut off by the end of the recording"`` (drawn to
the recording's end), ``"entered before the recording"`` (an exit without an
entry: drawn from the recording's start) or ``"resynchronized"`` (damaged).
Events are written as frames close, so they are ordered by end time (the trace
viewers sort them).

An entry-only recording (and the entry-only calls of a graph recording) gives
instant events (``"ph":"i"``, thread scope ``"s":"t"``) named after the traced
function, with its caller in ``args``.

``ts`` and ``dur`` are in microseconds since the recording started, with three
decimals so no nanosecond is rounded away.  Metadata events name each process
(the traced one by its command; a forked child's records belong to the child's
own pid) and each thread (``name-tid``, as in the text dump).  One event per
line, so the file also diffs and greps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from ._chunks import chunks
from ._frames import CALL, CUT, EXIT, RESYNC, UNWOUND, FramePass, is_graph_recording
from ._view import RecordingLike, RecordingView, is_count_mode
from .ftrace import count_mode_refusal

_ENDED = {UNWOUND: "unwound", CUT: "cut off by the end of the recording", RESYNC: "resynchronized"}


def _us(ns: int) -> str:
    return f"{ns // 1000}.{ns % 1000:03d}"


class _Threads:
    """Metadata events for each thread (and forked process) the first time it appears."""

    def __init__(self, view: RecordingView) -> None:
        self.view = view
        self.pid = int(view.recording.pid)
        self.processes: dict[int, int] = {}  # tid -> pid, once its metadata is written

    def new(self, tids: set[int]) -> list[str]:
        parts = []
        for tid in sorted(tids - self.processes.keys()):
            owner = self.processes[tid] = self.view.process_of(tid)
            label = json.dumps(self.view.thread_label(tid))
            if owner != self.pid:
                parts.append(f',\n{{"name":"process_name","ph":"M","pid":{owner},"tid":{owner},'
                             f'"args":{{"name":{label}}}}}')
            parts.append(f',\n{{"name":"thread_name","ph":"M","pid":{owner},"tid":{tid},"args":{{"name":{label}}}}}')
        return parts


@dataclass(frozen=True)
class ChromeReporter:
    def render(self, recording: RecordingLike, out: TextIO) -> None:
        if is_count_mode(recording):
            raise count_mode_refusal("timed calls")
        view = RecordingView(recording)
        pid = int(recording.pid)
        out.write('{"traceEvents":[\n')
        out.write(json.dumps({"name": "process_name", "ph": "M", "pid": pid, "tid": pid,
                              "args": {"name": recording.command}}, separators=(",", ":")))
        threads = _Threads(view)
        graph = is_graph_recording(recording)
        if graph:
            self._frames(view, threads, out)
        else:
            self._instants(view, threads, out)
        other = {"textpoke": {"pid": pid, "command": recording.command, "records": recording.record_count,
                              "lost": int(recording.lost), "start_ns": int(recording.start_ns),
                              "end_ns": int(recording.end_ns), "cut": recording.cut, "graph": graph}}
        out.write(f'\n],\n"displayTimeUnit":"ns",\n"otherData":{json.dumps(other, separators=(",", ":"))}}}\n')

    def _instants(self, view: RecordingView, threads: _Threads, out: TextIO) -> None:
        for chunk in chunks(view, text=json.dumps):
            parts = threads.new(set(chunk.tid))
            parts += [
                f',\n{{"name":{function},"cat":"call","ph":"i","s":"t","ts":{_us(rel)},'
                f'"pid":{threads.processes[tid]},"tid":{tid},"args":{{"caller":{caller}}}}}'
                for rel, tid, kind, function, caller in zip(chunk.rel_ns, chunk.tid, chunk.kind, chunk.function,
                                                           chunk.caller)
                if kind == CALL
            ]
            out.write("".join(parts))

    def _frames(self, view: RecordingView, threads: _Threads, out: TextIO) -> None:
        names = [json.dumps(n) for n in view.function_names]
        caller_names: list[str] = []  # JSON text per caller id, extended as callers appear
        base = view.time_base_ns
        for chunk in FramePass(view).chunks():
            rec = chunk.records
            kind = rec["kind"]
            shown = chunk.close | (kind == CALL)
            if not shown.any():
                continue
            rows = np.flatnonzero(shown)
            parts = threads.new(set(rec["tid"][rows].tolist()))
            call_rows = rows[kind[rows] == CALL]
            callers = dict(zip(call_rows.tolist(), view.caller_ids(rec["caller"][call_rows]).tolist()))
            close_rows = rows[kind[rows] != CALL]
            enter_callers = dict(zip(close_rows.tolist(),
                                     view.caller_ids(chunk.enter_caller[close_rows]).tolist()))
            caller_names += [json.dumps(n) for n in view.caller_names[len(caller_names):]]
            for i, k, tid, fn, start, dur, orphan, arg0, ret in zip(
                    rows.tolist(), kind[rows].tolist(), rec["tid"][rows].tolist(), chunk.function[rows].tolist(),
                    chunk.start_ns[rows].tolist(), chunk.duration[rows].tolist(), chunk.orphan[rows].tolist(),
                    chunk.enter_arg0[rows].tolist(), rec["arg0"][rows].tolist()):
                owner = threads.processes[tid]
                if k == CALL:
                    parts.append(f',\n{{"name":{names[fn]},"cat":"call","ph":"i","s":"t",'
                                 f'"ts":{_us(int(rec["ts_ns"][i]) - base)},"pid":{owner},"tid":{tid},'
                                 f'"args":{{"caller":{caller_names[callers[i]]},"ended":"entry only"}}}}')
                    continue
                if orphan:
                    args = '"ended":"entered before the recording"'
                else:
                    args = f'"caller":{caller_names[enter_callers[i]]},"arg0":"{arg0:#x}"'
                    args += f',"ret":"{ret:#x}"' if k == EXIT else f',"ended":"{_ENDED[k]}"'
                parts.append(f',\n{{"name":{names[fn]},"cat":"function","ph":"X","ts":{_us(start - base)},'
                             f'"dur":{_us(dur)},"pid":{owner},"tid":{tid},"args":{{{args}}}}}')
            out.write("".join(parts))
