"""Reading a tracer's ring while the target runs: bulk numpy, never per record.

Per-CPU buffers (the rseq path of the trampolines) are complete up to their
``head``: the producer's last write for a record is the head increment, and
x86 makes stores visible in program order. So the reader, per buffer:

1. reads ``head`` (one aligned 8-byte load), then decodes slots ``[tail,
   head)`` straight out of the shared memory (two slices when they wrap),
   then stores ``limit = head + capacity`` (x86 does not move a store before
   earlier loads, so the producer reuses a slot only after it was read).

The shared fallback buffer hands out slots with ``cmpxchg`` before they are
written, so ``head`` may be ahead of complete records; each slot's commit word
(its timestamp, written last and never 0) says it is complete:

2. decode the committed prefix of ``[tail, head)``, zero those slots (so a
   reused slot reads uncommitted until rewritten), then store ``limit``.

Records are decoded into :data:`~textpoke.ring.format.RECORD_DTYPE` chunk by
chunk, timestamps converted to CLOCK_MONOTONIC ns in the same pass (see
:class:`RingReader` for the clock).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..target import _ptrace
from ..trampolines.tracer import CTL_HEAD, CTL_LIMIT, CTL_LOST, SLOT_SIZE, SLOTS_OFFSET, RingGeometry
from .._errors import UsageError
from .format import RAW_DTYPE, RECORD_DTYPE, read_ring_header

_CTL_WORDS = CTL_LIMIT // 8 + 1
_HEAD, _LOST, _LIMIT = CTL_HEAD // 8, CTL_LOST // 8, CTL_LIMIT // 8
#: Records decoded per step: the step's records and temporaries stay in L2.
_CHUNK = 1 << 13


@dataclass(frozen=True, eq=False)
class SiteTable:
    """What decoding needs per site id (arrays indexed by the id records carry)."""

    is_call: np.ndarray  # bool: a call site (else an fentry site)
    address: np.ndarray  # u64: the site
    callee: np.ndarray  # u64: the traced function (fentry site) or the callee (call site)

    @classmethod
    def build(cls, *, is_call: Sequence[bool], address: Sequence[int], callee: Sequence[int]) -> SiteTable:
        return cls(is_call=np.asarray(is_call, dtype=bool), address=np.asarray(address, dtype=np.uint64),
                   callee=np.asarray(callee, dtype=np.uint64))

    @property
    def any_call(self) -> bool:
        return bool(self.is_call.any())


#: The part of a record laid out like a slot, as one opaque field (see format.RECORD_DTYPE).
_SLOT_PART = np.dtype({"names": ["slot"], "formats": [f"V{SLOT_SIZE}"], "offsets": [0],
                       "itemsize": RECORD_DTYPE.itemsize})


def decode_into(out: np.ndarray, raw: np.ndarray, sites: SiteTable, clock: TscClock | None = None) -> None:
    """RAW_DTYPE slots -> RECORD_DTYPE records, in bulk; ``ts_ns`` converted with
    ``clock`` (left in TSC ticks without one).

    A record starts as a copy of its slot (same layout); then the callee comes
    from the site table, and a call site's caller is the site itself (its slot
    has no caller word). An fentry record's caller word is the traced
    function's return address into its caller. Chunks small enough for the
    second pass to find the first one's lines in L2."""
    head = out.view(_SLOT_PART)["slot"]
    whole = raw.view(f"V{SLOT_SIZE}")
    any_call = sites.any_call
    index = np.empty(min(len(raw), _CHUNK), dtype=np.intp)
    for lo in range(0, len(raw), _CHUNK):
        hi = min(lo + _CHUNK, len(raw))
        head[lo:hi] = whole[lo:hi]
        site = index[: hi - lo]
        np.copyto(site, raw["site"][lo:hi], casting="unsafe")
        out["callee"][lo:hi] = sites.callee.take(site, mode="clip")
        if any_call:
            np.copyto(out["caller"][lo:hi], sites.address.take(site, mode="clip"),
                      where=sites.is_call.take(site, mode="clip"))
        if clock is not None:
            clock.stamp(out[lo:hi])


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

    def stamp(self, records: np.ndarray) -> None:
        """Convert ``records["ts_ns"]`` from ticks to ns, in place (same arithmetic as
        :meth:`to_ns`), chunk by chunk through a buffer that stays in cache."""
        column = records["ts_ns"].view(np.int64)
        scratch = np.empty(min(len(column), _CHUNK), dtype=np.float64)  # small: malloc reuses it
        slope, offset = self.ns_per_tick, self._offset
        for lo in range(0, len(column), _CHUNK):
            part = column[lo : lo + _CHUNK]
            f = scratch[: len(part)]
            np.multiply(part, slope, out=f)
            np.add(f, offset, out=f)
            np.copyto(part, f, casting="unsafe")


class RingReader:
    """The reader's side of one ring (``data``: the tracer's data region, whose
    header (ring.format) gives the layout).

    Timestamps are converted while each drain's records are in cache, by a
    piecewise-linear clock: each drain takes a clock sample and converts its
    records with the segment from the previous point (first: the ``start``
    sample, taken before any site was patched) to that sample. The TSC is
    constant and nonstop while CLOCK_MONOTONIC may be slewed by NTP; following
    it segment by segment keeps records within a microsecond or so of the clock
    the program reads. Segments meet at their ends and every slope is
    positive, so time never runs backwards. A segment shorter than
    ``_MIN_SEGMENT_NS``, or whose slope strays from the last one (a sample
    disturbed by preemption), extends the last slope instead."""

    def __init__(self, data: memoryview, sites: SiteTable, *, start: ClockSample | None = None) -> None:
        geometry = read_ring_header(data)  # the layout as the region itself declares it
        if not isinstance(geometry, RingGeometry):
            raise UsageError("this textpoke ring holds counters, not records", hint="read it with Tracer.counts")
        g = self.geometry = geometry
        self.sites = sites
        self._anchor = start if start is not None else clock_sample()
        self._slope = TscClock.calibrate(seconds=_MIN_SEGMENT_NS / 1e9).ns_per_tick
        # Strided views: one row per buffer block (control words, then slots a page later).
        self._ctl = np.ndarray((g.buffers, _CTL_WORDS), dtype="<u8", buffer=data, offset=g.blocks_offset,
                               strides=(g.stride, 8))
        self._slots = np.ndarray((g.buffers, g.capacity), dtype=RAW_DTYPE, buffer=data,
                                 offset=g.blocks_offset + SLOTS_OFFSET, strides=(g.stride, SLOT_SIZE))
        self.records = 0  # records drained so far

    def lost(self) -> int:
        """Records that found their buffer full (every buffer, so far)."""
        return int(self._ctl[:, _LOST].sum())

    def committed(self) -> np.ndarray:
        """Records each buffer has taken so far (per-CPU buffers, then the fallback)."""
        return self._ctl[:, _HEAD] // np.uint64(SLOT_SIZE)

    def _tails(self) -> np.ndarray:
        return (self._ctl[:, _LIMIT] - np.uint64(self.geometry.bytes)) // np.uint64(SLOT_SIZE)

    def reserved_uncommitted(self) -> int:
        """Fallback slots handed out but not (yet) committed: a thread is writing them."""
        b = self.geometry.fallback
        return int(self._ctl[b, _HEAD] // SLOT_SIZE - self._tails()[b])

    def drain(self, *, into: np.ndarray | None = None) -> np.ndarray:
        """Every complete record not read yet, decoded (RECORD_DTYPE).

        ``into``: decode into this array (its first records) when it is large
        enough, instead of a new one."""
        g = self.geometry
        clock = self._next_segment()
        heads = self._ctl[:, _HEAD] // np.uint64(SLOT_SIZE)  # step 1: heads before any slot
        tails = self._tails()  # only we write limits
        pending = (heads - tails).astype(np.int64)
        total = int(pending.sum())
        out = into[:total] if into is not None and len(into) >= total else np.empty(total, dtype=RECORD_DTYPE)
        done = 0
        for b in np.flatnonzero(pending[: g.cpus]).tolist():
            for view in self._views(b, int(tails[b]), int(heads[b])):
                decode_into(out[done : done + len(view)], view, self.sites, clock)
                done += len(view)
            self._ctl[b, _LIMIT] = int(heads[b]) * SLOT_SIZE + g.bytes
        if pending[g.fallback]:
            done += self._drain_fallback(out[done:], int(tails[g.fallback]), int(heads[g.fallback]), clock)
        self.records += done
        return out if done == len(out) else out[:done]

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

    def _drain_fallback(self, out: np.ndarray, tail: int, head: int, clock: TscClock) -> int:
        """Step 2: the committed prefix of the fallback buffer; zero it; advance."""
        b = self.geometry.fallback
        done = 0
        for view in self._views(b, tail, head):
            uncommitted = np.flatnonzero(view["ts"] == 0)
            ready = int(uncommitted[0]) if len(uncommitted) else len(view)
            decode_into(out[done : done + ready], view[:ready], self.sites, clock)
            view[:ready] = 0
            done += ready
            if ready < len(view):
                break
        self._ctl[b, _LIMIT] = (tail + done) * SLOT_SIZE + self.geometry.bytes
        return done


__all__ = ["ClockSample", "RingReader", "SiteTable", "TscClock", "clock_sample", "decode_into"]
