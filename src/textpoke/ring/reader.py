"""Reading a tracer's ring while the target runs: bulk numpy, never per record.

Two halves, run by two threads of the tool (see :mod:`textpoke.capture.drain`):

**Draining** (:meth:`RingReader.drain`) frees the ring as fast as memory allows:
it copies every complete slot out of the shared memory into a staging array,
as raw slots, and gives the space back. Per-CPU buffers (the rseq path of the
trampolines) are complete up to their ``head``: the producer's last write for a
record is the head increment, and x86 makes stores visible in program order.
So, per buffer:

1. read ``head`` (one aligned 8-byte load), then copy slots ``[tail, head)``
   (two slices when they wrap), then store ``limit = head + capacity`` (x86 does
   not move a store before earlier loads, so a producer reuses a slot only after
   it was copied), then wake the writers sleeping on that limit, if any.

The shared fallback buffer hands out slots with ``cmpxchg`` before they are
written, so ``head`` may be ahead of complete records; each slot's commit word
(its timestamp, written last and never 0) says it is complete:

2. copy the committed prefix of ``[tail, head)``, zero those slots (so a reused
   slot reads uncommitted until rewritten), then store ``limit``.

Writers whose buffer is full wait for the reader (trampolines.tracer,
``wait_for_reader``) while ``rdtsc`` is below the header's deadline:
:meth:`RingReader.keep_waiting` pushes it ahead (lossless mode) or stores 0
(drop mode, and at the end). Between drains the reader sleeps on the header's
bell (:meth:`RingReader.sleep`), which writers ring when a buffer crosses a half
or is full: it is woken when there is work, not polled.

**Decoding** (:func:`decode`) turns one drain's raw slots into
:data:`~textpoke.ring.format.RECORD_DTYPE` records, buffer after buffer, each
buffer's run in time order: TSC converted to CLOCK_MONOTONIC ns with the
drain's clock segment (see :class:`RingReader`), the site word split into id
and kind, the CPU of each record from the buffer it came from. Merging the runs
into one time order is left to whoever reads the recording
(:func:`~textpoke.ring.format.in_time_order`): it is the costliest step by far
(a stable sort: 6 ns per record of the 10 decoding takes), and the reader that
must keep up with the traced program is the one that can least afford it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..target import _ptrace
from ..trampolines.tracer import (
    CTL_HEAD,
    CTL_LIMIT,
    CTL_LOST,
    CTL_WAITERS,
    HDR_BELL,
    HDR_DEADLINE,
    HDR_READER_PID,
    HDR_SLEEPING,
    SLOT_SIZE,
    SLOTS_OFFSET,
    RingGeometry,
)
from .._errors import UsageError
from .format import KIND_SHIFT, RAW_DTYPE, RECORD_DTYPE, SITE_MASK, UNKNOWN_CPU, read_ring_header

_CTL_WORDS = CTL_WAITERS // 8 + 1
_HEAD, _LOST, _LIMIT, _WAITERS = CTL_HEAD // 8, CTL_LOST // 8, CTL_LIMIT // 8, CTL_WAITERS // 8
#: Records decoded per step: the step's records and temporaries stay in L2.
_CHUNK = 1 << 14
_INT_MAX = 0x7FFF_FFFF


@dataclass(frozen=True, eq=False)
class SiteTable:
    """What decoding needs per site id (arrays indexed by the id records carry)."""

    is_call: np.ndarray  # bool: a call site (else an fentry site)
    address: np.ndarray  # u64: the site

    @classmethod
    def build(cls, *, is_call: Sequence[bool], address: Sequence[int]) -> SiteTable:
        return cls(is_call=np.asarray(is_call, dtype=bool), address=np.asarray(address, dtype=np.uint64))

    @property
    def any_call(self) -> bool:
        return bool(self.is_call.any())


#: The part of a record laid out like a slot, as one opaque field (see format.RECORD_DTYPE).
_SLOT_PART = np.dtype({"names": ["slot"], "formats": [f"V{SLOT_SIZE}"], "offsets": [0],
                       "itemsize": RECORD_DTYPE.itemsize})


@dataclass(frozen=True)
class Drained:
    """One drain: ``count`` raw slots at the start of the staging array, buffer after
    buffer (``per_buffer[b]`` of buffer b, each run in commit order), and the clock
    segment that converts their timestamps."""

    count: int
    per_buffer: np.ndarray  # int64, one per buffer (per-CPU buffers, then the fallback)
    clock: TscClock


class Decoder:
    """Decodes drains into an array the caller keeps (a fresh
    one per drain would cost a page fault per 100 records). :meth:`decode`:

    1. a record starts as a copy of its slot (same layout), in drain order: buffer
       after buffer, each buffer's run in time order;
    2. the timestamp becomes CLOCK_MONOTONIC ns (the drain's clock segment), the
       site word its id and kind, the CPU the buffer's (UNKNOWN_CPU for the
       fallback), and a call site's caller the site itself (its slot has no caller
       word)."""

    def __init__(self, sites: SiteTable, *, cpus: int) -> None:
        self.sites = sites
        self.cpus = cpus

    def decode(self, raw: np.ndarray, drained: Drained, out: np.ndarray) -> np.ndarray:
        """``drained``'s records from ``raw`` (RAW_DTYPE) into ``out``'s first records,
        in drain order (:func:`~textpoke.ring.format.in_time_order` merges the runs)."""
        n = drained.count
        raw, out = raw[:n], out[:n]
        out.view(_SLOT_PART)["slot"] = raw.view(f"V{SLOT_SIZE}")
        cpu = out["cpu"]
        start = 0
        for buffer, count in enumerate(drained.per_buffer.tolist()):
            if count:
                cpu[start : start + count] = buffer if buffer < self.cpus else UNKNOWN_CPU
                start += count
        word = out["site"]
        if n and int(word.max()) > SITE_MASK:
            np.right_shift(word, KIND_SHIFT, out=out["kind"], casting="unsafe")
            np.bitwise_and(word, SITE_MASK, out=word)
        else:
            out["kind"] = 0
        if self.sites.any_call:
            site = word.astype(np.intp)
            np.copyto(out["caller"], self.sites.address.take(site, mode="clip"),
                      where=self.sites.is_call.take(site, mode="clip"))
        drained.clock.stamp(out)  # in cache-sized pieces: faster than one pass per step
        return out


def decode(raw: np.ndarray, drained: Drained, sites: SiteTable, *, cpus: int) -> np.ndarray:
    """One drain's raw slots -> RECORD_DTYPE records in drain order (see :class:`Decoder`;
    this one allocates what it needs: for tests and one-off use)."""
    return Decoder(sites, cpus=cpus).decode(raw, drained, np.zeros(drained.count, RECORD_DTYPE))


#: A clock segment is at least this long (shorter ones would make a noisy slope),
#: and its slope within this of the last one (CLOCK_MONOTONIC slews by 500 ppm at most).
_MIN_SEGMENT_NS = 2_000_000
_MAX_SLOPE_CHANGE = 0.002


@dataclass(frozen=True)
class ClockSample:
    tsc: int
    ns: int


def clock_sample(*, tries: int = 5) -> ClockSample:
    """A (TSC, CLOCK_MONOTONIC ns) pair read as close together as we can.

    Each try brackets one clock read between two rdtsc; the narrowest bracket
    wins and its midpoint is the TSC at the clock read."""
    best: tuple[int, int, int] | None = None
    for _ in range(tries):
        before = _ptrace.rdtsc()
        ns = time.monotonic_ns()
        after = _ptrace.rdtsc()
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) // 2, ns)
    assert best is not None
    return ClockSample(tsc=best[1], ns=best[2])


@dataclass(frozen=True)
class TscClock:
    """TSC ticks -> CLOCK_MONOTONIC ns: the line through two samples (constant, nonstop TSC)."""

    tsc0: int
    ns0: int
    ns_per_tick: float

    @classmethod
    def between(cls, first: ClockSample, last: ClockSample) -> TscClock:
        ticks = last.tsc - first.tsc
        if ticks <= 0:
            raise ValueError("clock samples must be taken in order")
        return cls(tsc0=first.tsc, ns0=first.ns, ns_per_tick=(last.ns - first.ns) / ticks)

    @classmethod
    def calibrate(cls, *, seconds: float = 0.01) -> TscClock:
        first = clock_sample()
        time.sleep(seconds)
        return cls.between(first, clock_sample())

    @property
    def _offset(self) -> float:
        # ns = ticks * slope + (ns0 - tsc0 * slope): one multiply and one add per
        # record. In float64 the product (~1e12..1e15 ns) is exact to well under
        # a ns for 104 days of uptime (2**53 ns); ticks fit int64, whose
        # conversion to float numpy does in SIMD (uint64's it does not). +0.5: rounding.
        return self.ns0 - self.tsc0 * self.ns_per_tick + 0.5

    def to_ns(self, ticks: np.ndarray) -> np.ndarray:
        signed = np.asarray(ticks, dtype=np.uint64).view(np.int64)
        return (signed * self.ns_per_tick + self._offset).astype(np.int64).view(np.uint64)

    def ticks_at(self, ns: int) -> int:
        """The TSC value at CLOCK_MONOTONIC ``ns`` on this line."""
        return self.tsc0 + round((ns - self.ns0) / self.ns_per_tick)

    def stamp(self, records: np.ndarray, *, scratch: np.ndarray | None = None) -> None:
        """Convert ``records["ts_ns"]`` from ticks to ns, in place (same arithmetic as
        :meth:`to_ns`): through ``scratch`` (float64, as long as ``records``) when
        given, else chunk by chunk through a small buffer that stays in cache."""
        column = records["ts_ns"].view(np.int64)
        slope, offset = self.ns_per_tick, self._offset
        step = len(column) if scratch is not None else _CHUNK
        if scratch is None:
            scratch = np.empty(min(len(column), _CHUNK), dtype=np.float64)  # small: malloc reuses it
        for lo in range(0, len(column), step):
            part = column[lo : lo + step]
            f = scratch[: len(part)]
            np.multiply(part, slope, out=f)
            np.add(f, offset, out=f)
            np.copyto(part, f, casting="unsafe")


class RingReader:
    """The reader's side of one ring (``data``: the tracer's data region, whose
    header (ring.format) gives the layout).

    Timestamps are converted by a piecewise-linear clock: each drain takes a
    clock sample, and its records are converted with the segment from the
    previous point (first: the ``start`` sample, taken before any site was
    patched) to that sample. The TSC is constant and nonstop while
    CLOCK_MONOTONIC may be slewed by NTP; following it segment by segment keeps
    records within a microsecond or so of the clock the program reads. Segments
    meet at their ends and every slope is positive, so time never runs
    backwards. A segment shorter than ``_MIN_SEGMENT_NS``, or whose slope strays
    from the last one (a sample disturbed by preemption), extends the last slope
    instead."""

    def __init__(self, data: memoryview, *, start: ClockSample | None = None) -> None:
        geometry = read_ring_header(data)  # the layout as the region itself declares it
        if not isinstance(geometry, RingGeometry):
            raise UsageError("this textpoke ring holds counters, not records", hint="read it with Tracer.counts")
        g = self.geometry = geometry
        self._anchor = start if start is not None else clock_sample()
        self._slope = TscClock.calibrate(seconds=_MIN_SEGMENT_NS / 1e9).ns_per_tick
        # Strided views: one row per buffer block (control words, then slots a page later).
        self._ctl = np.ndarray((g.buffers, _CTL_WORDS), dtype="<u8", buffer=data, offset=g.blocks_offset,
                               strides=(g.stride, 8))
        self._slots = np.ndarray((g.buffers, g.capacity), dtype=RAW_DTYPE, buffer=data,
                                 offset=g.blocks_offset + SLOTS_OFFSET, strides=(g.stride, SLOT_SIZE))
        self._header = np.ndarray((HDR_READER_PID // 8 + 1,), dtype="<u8", buffer=data)
        self._words = np.ndarray((HDR_READER_PID // 4 + 1,), dtype="<u4", buffer=data)
        # Futex addresses in this process: the bell, and each buffer's limit (low half).
        self._bell_address = _ptrace.buffer_address(data, HDR_BELL)
        self._limit_address = [_ptrace.buffer_address(data, g.blocks_offset + b * g.stride + CTL_LIMIT)
                               for b in range(g.buffers)]
        self._words[HDR_READER_PID // 4] = os.getpid()
        self.records = 0  # records drained so far
        self.wakes = 0  # times a drain woke writers sleeping on a full buffer

    # -- the writers' side of the contract -----------------------------------------------
    def keep_waiting(self, seconds: float) -> None:
        """Let writers that find their buffer full wait for us for up to ``seconds``
        from now (0: never wait; they drop and count instead)."""
        if seconds <= 0:
            self._header[HDR_DEADLINE // 8] = 0
            return
        ticks = int(seconds * 1e9 / self._slope)
        self._header[HDR_DEADLINE // 8] = _ptrace.rdtsc() + ticks

    def sleep(self, timeout_s: float, *, enough: int) -> None:
        """Sleep on the bell until a writer rings it or ``timeout_s`` passes, unless
        ``enough`` records are pending already.

        The bell's value is read before the check: a writer that rings it after
        that makes the futex wait return at once (its value changed), so no bell
        is missed between the check and the sleep."""
        bell = int(self._words[HDR_BELL // 4])
        self._words[HDR_SLEEPING // 4] = 1
        try:
            if self.pending() < enough:
                _ptrace.futex_wait(self._bell_address, bell, timeout_s)
        finally:
            self._words[HDR_SLEEPING // 4] = 0

    # -- counting ------------------------------------------------------------------------
    def lost(self) -> int:
        """Records that found their buffer full and were dropped (every buffer, so far)."""
        return int(self._ctl[:, _LOST].sum())

    def committed(self) -> np.ndarray:
        """Records each buffer has taken so far (per-CPU buffers, then the fallback)."""
        return self._ctl[:, _HEAD] // np.uint64(SLOT_SIZE)

    def _tails(self) -> np.ndarray:
        return (self._ctl[:, _LIMIT] - np.uint64(self.geometry.bytes)) // np.uint64(SLOT_SIZE)

    def pending(self) -> int:
        """Records taken (or, in the fallback buffer, reserved) and not drained yet."""
        return int((self.committed() - self._tails()).sum())

    def reserved_uncommitted(self) -> int:
        """Fallback slots handed out but not (yet) committed: a thread is writing them."""
        b = self.geometry.fallback
        return int(self._ctl[b, _HEAD] // SLOT_SIZE - self._tails()[b])

    # -- draining --------------------------------------------------------------------------
    def drain(self, into: np.ndarray) -> Drained:
        """Copy every complete record not read yet into ``into`` (RAW_DTYPE, at least
        ``geometry.buffers * geometry.capacity`` long), give the space back, and wake
        the writers waiting for it. Steps 1 and 2 of the module docstring."""
        g = self.geometry
        clock = self._next_segment()
        heads = self._ctl[:, _HEAD] // np.uint64(SLOT_SIZE)  # step 1: heads before any slot
        tails = self._tails()  # only we write limits
        pending = (heads - tails).astype(np.int64)
        per_buffer = np.zeros(g.buffers, dtype=np.int64)
        done = 0
        for b in np.flatnonzero(pending[: g.cpus]).tolist():
            for view in self._views(b, int(tails[b]), int(heads[b])):
                into[done : done + len(view)] = view
                done += len(view)
            per_buffer[b] = pending[b]
            self._ctl[b, _LIMIT] = int(heads[b]) * SLOT_SIZE + g.bytes
            self._wake(b)
        if pending[g.fallback]:
            taken = self._drain_fallback(into[done:], int(tails[g.fallback]), int(heads[g.fallback]))
            per_buffer[g.fallback] = taken
            done += taken
        self.records += done
        return Drained(count=done, per_buffer=per_buffer, clock=clock)

    def _wake(self, b: int) -> None:
        if self._ctl[b, _WAITERS] & 0xFFFF_FFFF:
            _ptrace.futex_wake(self._limit_address[b], _INT_MAX)
            self.wakes += 1

    def _next_segment(self) -> TscClock:
        """The clock for this drain's records (see the class docstring); advances the anchor."""
        anchor, now = self._anchor, clock_sample()
        ticks = now.tsc - anchor.tsc
        slope = (now.ns - anchor.ns) / ticks if ticks > 0 else 0.0
        if now.ns - anchor.ns >= _MIN_SEGMENT_NS and abs(slope / self._slope - 1) < _MAX_SLOPE_CHANGE:
            self._slope, end = slope, now
        else:
            end = ClockSample(tsc=max(now.tsc, anchor.tsc), ns=anchor.ns + round(max(ticks, 0) * self._slope))
        self._anchor = end
        return TscClock(tsc0=anchor.tsc, ns0=anchor.ns, ns_per_tick=self._slope)

    def _views(self, b: int, tail: int, head: int) -> Iterator[np.ndarray]:
        cap = self.geometry.capacity
        start = tail & (cap - 1)
        n = head - tail
        first = min(n, cap - start)
        yield self._slots[b, start : start + first]
        if n > first:
            yield self._slots[b, : n - first]

    def _drain_fallback(self, out: np.ndarray, tail: int, head: int) -> int:
        """Step 2: the committed prefix of the fallback buffer; zero it; advance."""
        b = self.geometry.fallback
        done = 0
        for view in self._views(b, tail, head):
            uncommitted = np.flatnonzero(view["ts"] == 0)
            ready = int(uncommitted[0]) if len(uncommitted) else len(view)
            out[done : done + ready] = view[:ready]
            view[:ready] = 0
            done += ready
            if ready < len(view):
                break
        self._ctl[b, _LIMIT] = (tail + done) * SLOT_SIZE + self.geometry.bytes
        self._wake(b)
        return done


__all__ = ["ClockSample", "Decoder", "Drained", "RingReader", "SiteTable", "TscClock", "clock_sample", "decode"]
