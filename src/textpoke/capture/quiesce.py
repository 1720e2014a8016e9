"""When has every thread left the trampolines? (after the sites were restored)

Restoring a site stops new entries, but a thread may have entered a routine
just before and been preempted there; it writes its record whenever it runs
again. Exactness needs that record, so the capture keeps draining until each
thread that existed at the restore is known to be out:

- it has exited; or
- it has run long enough since the restore to finish a routine (its CPU time in
  /proc/PID/task/TID/schedstat grew by RAN_NS: a routine's longest path without
  a wait is well under a microsecond); or
- it is blocked in a system call at an address outside our code (a thread
  waiting for the reader inside a routine is blocked *at* our code, and is not
  out until it was woken and ran).

This is how the kernel's RCU-tasks decides a task is off a trampoline
(voluntary switches), with CPU time standing in for what user space cannot see.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..poke.resident import RAN_NS, thread_pc
from ..target.process import thread_cpu_ns


@dataclass
class Quiescence:
    """``settled()`` turns True once every thread seen at construction is out (see above)."""

    pid: int
    code: range  # the trampolines' code in the target
    exclude: frozenset[int]  # textpoke's own threads (the agent)

    def __post_init__(self) -> None:
        self._start: dict[int, int] = {}
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
        except OSError:
            tids = []
        for tid in tids:
            if tid in self.exclude:
                continue
            ns = thread_cpu_ns(self.pid, tid)
            if ns is not None:
                self._start[tid] = ns
        self.waiting = len(self._start)

    def wait(self, limit_s: float) -> bool:
        """Poll :meth:`settled` for at most ``limit_s``; its last answer."""
        deadline = time.monotonic() + limit_s
        while not self.settled():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def settled(self) -> bool:
        for tid, start in list(self._start.items()):
            ns = thread_cpu_ns(self.pid, tid)
            if ns is None or ns - start >= RAN_NS:
                del self._start[tid]
                continue
            pc = thread_pc(self.pid, tid)
            if pc is not None and pc not in self.code:
                del self._start[tid]
        self.waiting = len(self._start)
        return not self._start


__all__ = ["Quiescence"]
