"""From the ring to the file while the target runs: two threads, bounded memory.

- the **drain** thread empties the ring (``RingReader.drain``: a copy of raw
  slots into a staging array, then the space is given back and waiting writers
  are woken), keeps the writers' deadline ahead while the pipeline moves
  (lossless mode), and sleeps on the ring's bell when there is nothing to do;
- the **write** thread decodes each staging array (``ring.reader.decode``: ns
  timestamps, one run per buffer), holds back what could still precede the next
  drain, writes whole chunks to the recording file and names the threads it sees.

Staging arrays circulate between the two through two queues (``free`` ->
drain -> ``full`` -> write -> ``free``): with two of them, the tool holds at
most two drains and the chunk being written, whatever the length of the trace.
When the write thread falls behind (a slow disk), the drain thread has no free
staging array, the ring fills, and traced threads wait: the cost of an exact
trace lands on the traced program, as it must. The deadline moves on only while
the write thread makes progress, so a stuck pipeline turns into counted drops
after ``wait_s``, never into a hung program.

**Order.** A drain reads the buffers' heads one after another, so a record
committed between two of those reads may miss this drain while a later record
of the same thread (on another CPU) makes it. The write thread therefore holds
back the records of a drain that are not older than the next drain's oldest
record and adds them to it: every chunk written follows the previous one in
time. Inside a chunk the runs are merged by whoever reads it
(``ring.format.in_time_order``), so each thread's records come out in the order
it made them; the write thread, which must keep up with the traced program,
never sorts.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..ring.file import ChunkKind, RecordingWriter
from ..ring.format import RAW_DTYPE, RECORD_DTYPE, RecordKind
from ..ring.reader import Decoder, Drained, RingReader, SiteTable
from ..ring.recording import ThreadInfo, threads_to_json

#: The drain thread sleeps on the bell at most this long (then pushes the deadline on).
SLEEP_S = 0.02
#: Staging arrays in circulation (each holds one whole ring).
STAGING = 2
#: Drains after the end, at most (see _drain_loop).
FINAL_DRAINS = 4
#: Wait for a free staging array in slices this long (to push the deadline on meanwhile).
_SLICE_S = 0.05
_STOP = None


@dataclass
class PipelineStats:
    """Counters the capture reports (read from other threads: plain ints)."""

    drained: int = 0  # records taken out of the ring
    written: int = 0  # records in the file
    calls: int = 0  # of them, the calls (entries: CALL and ENTER records)
    unwritten: int = 0  # records drained but not written (the file failed)
    chunks: int = 0
    drains: int = 0
    merges: int = 0  # drains merged with records of the one before (see _merge)


class Pipeline:
    """The two threads between one ring and one recording file; see the module docstring.

    :meth:`start` them; the traced program runs; :meth:`finish` drains what is
    left once ``settled()`` says no thread can still be writing, flushes and
    stops them. ``wait_s`` None: drop mode (writers never wait)."""

    def __init__(self, reader: RingReader, sites: SiteTable, writer: RecordingWriter, *, cpus: int,
                 wait_s: float | None, pid: int, name_threads: bool) -> None:
        self.reader = reader
        self.sites = sites
        self.writer = writer
        self.cpus = cpus
        self.wait_s = wait_s
        self.pid = pid
        self.name_threads = name_threads
        self.stats = PipelineStats()
        self.threads: dict[int, ThreadInfo] = {}
        self.error: BaseException | None = None  # the first failure of either thread
        self.failed = threading.Event()
        g = reader.geometry
        size = g.buffers * g.capacity
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(STAGING):
            self._free.put(np.empty(size, dtype=RAW_DTYPE))
        self._full: queue.Queue[tuple[np.ndarray, Drained] | None] = queue.Queue()
        # The write thread's record buffers, used over and over (fresh ones would cost a
        # page fault per 100 records): a drain decodes into a free one, which then holds
        # the carry until the next drain (see _merge).
        self._decoded = [np.zeros(size, dtype=RECORD_DTYPE) for _ in range(2)]  # pad bytes stay 0
        self._decoder = Decoder(sites, cpus=cpus)
        self._closing = threading.Event()
        self._settled: Callable[[], bool] = lambda: True
        self._then: Callable[[], None] = lambda: None
        self._settle_limit_s = 0.0
        self._carry = np.empty(0, dtype=RECORD_DTYPE)
        self._carry_buffer = 0
        self._drain_thread = threading.Thread(target=self._drain_loop, name="textpoke-drain", daemon=True)
        self._write_thread = threading.Thread(target=self._write_loop, name="textpoke-write", daemon=True)
        self._busy = max(16, g.capacity // 4)  # a drain this big: drain again at once

    # -- lifetime --------------------------------------------------------------------------
    def start(self) -> None:
        self._keep_waiting()
        self._drain_thread.start()
        self._write_thread.start()

    def finish(self, *, settled: Callable[[], bool], limit_s: float, then: Callable[[], None]) -> None:
        """After the last site was restored: drain until ``settled()`` (no thread can
        still be in a trampoline) or ``limit_s`` passed, call ``then()`` (the tracer
        stops recording), stop waits, drain the rest, flush and stop both threads.
        Raises what a thread failed with."""
        self._settled, self._settle_limit_s, self._then = settled, limit_s, then
        self._closing.set()
        self._drain_thread.join()
        self._write_thread.join()
        if self.error is not None and not isinstance(self.error, OSError):
            raise self.error

    def _keep_waiting(self) -> None:
        self.reader.keep_waiting(self.wait_s or 0.0)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.failed.set()

    # -- the drain thread ----------------------------------------------------------------
    def _drain_loop(self) -> None:
        try:
            while not self._closing.is_set():
                if not self._drain_once():
                    self.reader.sleep(SLEEP_S, enough=self._busy)
            deadline = time.monotonic() + self._settle_limit_s
            while True:  # the program may still be inside a trampoline: keep the ring moving
                self._drain_once()
                if self._settled() or time.monotonic() > deadline:
                    break
                time.sleep(0.001)
            self._then()
            self.reader.keep_waiting(0)  # from now on nobody waits for us
            # What is left, a few drains at most.
            for _ in range(FINAL_DRAINS):
                if not self._drain_once(final=True):
                    break
        except BaseException as exc:  # handed to finish(); the target never waits on a dead reader
            self.reader.keep_waiting(0)
            self._fail(exc)
        finally:
            self._full.put(_STOP)

    def _drain_once(self, *, final: bool = False) -> bool:
        """One drain; True if it was busy (drain again at once). Pushes the deadline
        on only while the write thread moves (see the module docstring)."""
        moved = self.stats.written + self.stats.unwritten
        if not final:
            self._keep_waiting()
        staging = None
        while staging is None:
            try:
                staging = self._free.get(timeout=_SLICE_S)
            except queue.Empty:
                if not self._write_thread.is_alive():
                    raise RuntimeError("the recording's write thread stopped") from self.error
                now = self.stats.written + self.stats.unwritten
                if now != moved and not final:  # the writer moves: keep the traced threads waiting
                    moved = now
                    self._keep_waiting()
        drained = self.reader.drain(staging)
        self.stats.drains += 1
        if drained.count == 0:
            self._free.put(staging)
            return False
        self.stats.drained += drained.count
        self._full.put((staging, drained))
        return drained.count >= self._busy

    # -- the write thread ----------------------------------------------------------------
    def _write_loop(self) -> None:
        try:
            while True:
                item = self._full.get()
                if item is _STOP:
                    break
                staging, drained = item
                free = 1 - self._carry_buffer
                try:
                    records = self._decoder.decode(staging, drained, self._decoded[free])
                finally:
                    self._free.put(staging)
                self._merge(records, free)
            self._emit(self._carry)
            self._carry = self._carry[:0]
        except BaseException as exc:
            self._fail(exc)
            while self._full.get() is not _STOP:  # keep the drain thread going; count what is lost
                pass

    def _merge(self, records: np.ndarray, buffer: int) -> None:
        """Write what is older than every record of this drain (``records``, decoded in
        buffer ``buffer``); keep the rest with it, as the new carry (runs stay runs: the
        reader merges them)."""
        carry = self._carry
        if not len(records):
            return  # the carry stays, in its buffer
        if len(carry):
            first = records["ts_ns"].min()
            late = carry["ts_ns"] >= first
            if not late.any():
                self._emit(carry)
            else:  # records that missed the previous drain: a copy of their own
                self._emit(carry[~late])
                records = np.concatenate((carry[late], records))
                self.stats.merges += 1
        self._carry = records
        self._carry_buffer = buffer

    def _emit(self, records: np.ndarray) -> None:
        if not len(records):
            return
        if self.error is not None:  # the file failed: what we could not write is counted
            self.stats.unwritten += len(records)
            return
        try:
            self.writer.write_records(records)
        except OSError as exc:
            self.stats.unwritten += len(records)
            self._fail(exc)
            return
        self.stats.written += len(records)
        # calls: CALL and ENTER records, i.e. all but EXIT (1) and UNWOUND (2), in one pass
        self.stats.calls += len(records) - int(np.count_nonzero((records["kind"] - np.uint8(RecordKind.EXIT)) < 2))
        self.stats.chunks = self.writer.chunks
        if self.name_threads:
            self._name_new_threads(records["tid"])

    def _name_new_threads(self, tids: np.ndarray) -> None:
        """Look up the threads not seen before (their process and name), while they
        likely still exist; cheap: only where the tid changes from record to record."""
        changes = np.flatnonzero(tids[1:] != tids[:-1]) + 1
        seen = set(tids[changes].tolist())
        seen.add(int(tids[0]))
        new = seen - self.threads.keys()
        if not new:
            return
        for tid in sorted(new):
            self.threads[tid] = thread_info(self.pid, tid)
        try:
            self.writer.write_json(ChunkKind.THREADS, threads_to_json({t: self.threads[t] for t in new}))
        except OSError as exc:
            self._fail(exc)


def thread_info(pid: int, tid: int) -> ThreadInfo:
    """A thread's process and name: a thread of ``pid``, or a process of its own (a
    forked child, whose tid is its pid); ``?`` when it is gone already."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return ThreadInfo(pid=pid, name=f.read().strip())
    except OSError:
        pass
    try:
        with open(f"/proc/{tid}/status") as f:
            fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        return ThreadInfo(pid=int(fields["Tgid"]), name=fields["Name"].strip())
    except (OSError, KeyError, ValueError):
        return ThreadInfo(pid=pid, name="?")


__all__ = ["Pipeline", "PipelineStats", "SLEEP_S", "thread_info"]
