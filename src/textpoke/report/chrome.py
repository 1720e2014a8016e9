"""``textpoke dump --format chrome``: Chrome Trace Event JSON (ui.perfetto.dev, chrome://tracing).

Each call is an instant event (``"ph":"i"``, thread scope ``"s":"t"``) named after
the traced function, with its caller in ``args``; ``ts`` is in microseconds since
the recording started, with three decimals so no nanosecond is rounded away.
Metadata events name the process (its command) and each thread (``comm-tid``,
as in the text dump).  One event per line, so the file also diffs and greps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TextIO

from ._chunks import chunks
from ._view import RecordingLike, RecordingView, comm_of, is_count_mode
from .ftrace import count_mode_refusal


@dataclass(frozen=True)
class ChromeReporter:
    def render(self, recording: RecordingLike, out: TextIO) -> None:
        if is_count_mode(recording):
            raise count_mode_refusal("timed calls")
        view = RecordingView(recording)
        pid = int(recording.pid)
        comm = comm_of(recording.command)
        metadata = [{"name": "process_name", "ph": "M", "pid": pid, "tid": pid, "args": {"name": recording.command}}]
        metadata += [
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": f"{comm}-{tid}"}}
            for tid in view.threads.values.tolist()
        ]
        out.write('{"traceEvents":[\n')
        out.write(",\n".join(json.dumps(event, separators=(",", ":")) for event in metadata))
        functions = [json.dumps(n) for n in view.function_names]
        callers = [json.dumps(n) for n in view.caller_names]
        for chunk in chunks(view, function_text=functions, caller_text=callers):
            out.write("".join(
                f',\n{{"name":{function},"cat":"call","ph":"i","s":"t","ts":{rel // 1000}.{rel % 1000:03d},'
                f'"pid":{pid},"tid":{tid},"args":{{"caller":{caller}}}}}'
                for rel, tid, function, caller in zip(chunk.rel_ns, chunk.tid, chunk.function, chunk.caller)
            ))
        other = {"textpoke": {"pid": pid, "command": recording.command, "records": len(view.records),
                              "lost": int(recording.lost), "start_ns": int(recording.start_ns),
                              "end_ns": int(recording.end_ns)}}
        out.write(f'\n],\n"displayTimeUnit":"ns",\n"otherData":{json.dumps(other, separators=(",", ":"))}}}\n')
