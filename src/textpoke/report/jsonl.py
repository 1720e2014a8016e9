"""``textpoke dump --format json``: JSON Lines, one object per line.

JSON Lines rather than one array, so that a 10-million-call dump streams (no
reader has to hold it whole) and works line by line with ``jq -c``, ``grep``
and ``head``.  Every line has a ``type``:

- the first line, ``"recording"``: pid, command, start_ns, end_ns, records,
  lost, mode (``"trace"`` or ``"count"``) and the site table;
- then, in a trace, one object per record: ``"call"`` (an entry-only call),
  or in a function-graph recording ``"enter"``, ``"exit"`` and ``"unwound"``
  (``textpoke report``/``graph`` pair them into frames): ``t_ns`` (since
  start_ns), ``ts_ns`` (CLOCK_MONOTONIC), tid, cpu (null when unknown), site
  (id), function, caller (symbolized), caller_address and callee_address
  (``"0x..."`` strings: exact in every JSON reader), and arg0 (rdi at the call:
  the first integer argument; for an exit, rax: the return value);
- or, in a count-mode recording, one ``"count"`` per site: site, function, calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from ._chunks import chunks
from ..ring.format import UNKNOWN_CPU
from ._view import RecordingLike, RecordingView, is_count_mode

#: RecordKind -> the line's type (0 CALL, 1 EXIT, 2 UNWOUND, 3 ENTER).
_TYPES = {0: "call", 1: "exit", 2: "unwound", 3: "enter"}


def header_object(recording: RecordingLike, view: RecordingView) -> dict[str, object]:
    names = view.site_names
    return {
        "type": "recording",
        "pid": int(recording.pid),
        "command": recording.command,
        "start_ns": int(recording.start_ns),
        "end_ns": int(recording.end_ns),
        "records": recording.record_count,
        "lost": int(recording.lost),
        "cut": recording.cut,
        "metadata": recording.metadata,
        "mode": "count" if is_count_mode(recording) else "trace",
        "sites": [
            {"id": int(s.id), "address": f"{s.address:#x}", "kind": s.kind, "function": s.function,
             "target_name": s.target_name, "traces": names[i]}
            for i, s in enumerate(view.sites)
        ],
    }


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class JsonLinesReporter:
    def render(self, recording: RecordingLike, out: TextIO) -> None:
        view = RecordingView(recording)
        out.write(_compact(header_object(recording, view)) + "\n")
        if is_count_mode(recording):
            counts = np.asarray(recording.counts, dtype=np.int64).tolist()
            for site, name, calls in zip(view.sites, view.site_names, counts):
                out.write(_compact({"type": "count", "site": int(site.id), "function": name,
                                    "calls": int(calls)}) + "\n")
            return
        # Each distinct name is escaped once, not once per record.
        base = view.time_base_ns
        for chunk in chunks(view, text=json.dumps):
            out.write("".join(
                f'{{"type":"{_TYPES[kind]}","t_ns":{rel},"ts_ns":{rel + base},"tid":{tid},'
                f'"cpu":{"null" if cpu == UNKNOWN_CPU else cpu},"site":{site},'
                f'"function":{function},"caller":{caller},'
                f'"caller_address":"{caller_address:#x}","callee_address":"{callee_address:#x}",'
                f'"arg0":"{arg0:#x}"}}\n'
                for rel, tid, cpu, kind, site, function, caller, caller_address, callee_address, arg0 in zip(
                    chunk.rel_ns, chunk.tid, chunk.cpu, chunk.kind, chunk.site, chunk.function, chunk.caller,
                    chunk.caller_address, chunk.callee_address, chunk.arg0)
                if kind in _TYPES
            ))
