"""``textpoke dump --format chrome``: Chrome Trace Event JSON (ui.perfetto.dev, chrome://tracing).

Each call is an instant event (``"ph":"i"``, thread scope ``"s":"t"``) named after
the traced function, with its caller in ``args``; ``ts`` is in microseconds since
the recording started, with three decimals so no nanosecond is rounded away.
Metadata events name each process (the traced one by its command; a forked
child's records belong to the child's own pid) and each thread (``name-tid``,
as in the text dump).  One event per line, so the file also diffs and greps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TextIO

from ._chunks import chunks
from ._view import is_call, RecordingLike, RecordingView, is_count_mode
from .ftrace import count_mode_refusal


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
        processes: dict[int, int] = {}  # tid -> pid, once its metadata is written
        for chunk in chunks(view, text=json.dumps):
            parts = []
            for tid in set(chunk.tid) - processes.keys():
                owner = processes[tid] = view.process_of(tid)
                if owner != pid:
                    parts.append(f',\n{{"name":"process_name","ph":"M","pid":{owner},"tid":{owner},'
                                 f'"args":{{"name":{json.dumps(view.thread_label(tid))}}}}}')
                parts.append(f',\n{{"name":"thread_name","ph":"M","pid":{owner},"tid":{tid},'
                             f'"args":{{"name":{json.dumps(view.thread_label(tid))}}}}}')
            parts += [
                f',\n{{"name":{function},"cat":"call","ph":"i","s":"t","ts":{rel // 1000}.{rel % 1000:03d},'
                f'"pid":{processes[tid]},"tid":{tid},"args":{{"caller":{caller}}}}}'
                for rel, tid, kind, function, caller in zip(chunk.rel_ns, chunk.tid, chunk.kind, chunk.function,
                                                           chunk.caller)
                if is_call(kind)
            ]
            out.write("".join(parts))
        other = {"textpoke": {"pid": pid, "command": recording.command, "records": recording.record_count,
                              "lost": int(recording.lost), "start_ns": int(recording.start_ns),
                              "end_ns": int(recording.end_ns), "cut": recording.cut}}
        out.write(f'\n],\n"displayTimeUnit":"ns",\n"otherData":{json.dumps(other, separators=(",", ":"))}}}\n')
