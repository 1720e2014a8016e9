"""The layout of the shared memory textpoke's routines write, and of a record.

Shared by the code that writes it (tracer.py, graph.py: generated machine code)
and the code that reads it (ring.format, ring.reader): one definition of each
offset, size and kind.
"""

from __future__ import annotations

import enum

from ..poke.resident import PAGE

#: Bytes at the start of the data region reserved for the ring header (ring.format).
HEADER_SIZE = PAGE
#: One record slot (32 bytes): u64 ts (rdtsc), u32 tid, u32 site id, u64 caller word
#: (the return address above the one the routine was called with: for an fentry site
#: the traced function's return address into its caller, for a call site the call's
#: own return address, site + 5), u64 arg0 (rdi).
SLOT_TS = 0
SLOT_TID = 8
SLOT_SITE = 12
SLOT_CALLER = 16
SLOT_ARG0 = 24
SLOT_SIZE = 32
#: One block per buffer: the producer's line (head, lost), the reader's line (limit),
#: then the slots from the next page. ``head`` and ``limit`` count bytes (a multiple of
#: SLOT_SIZE, never wrapping): the slot of a head is ``head & (capacity*32 - 1)``.
#: The reader publishes ``limit = tail + capacity*32``, so "full" is one compare.
CTL_HEAD = 0
CTL_LOST = 8
CTL_LIMIT = 64
#: Writers sleeping on this buffer's limit (u32, ``lock inc``/``dec`` by them; the
#: reader wakes the futex on the limit's low half when it is not 0). A line of its own.
CTL_WAITERS = 128
SLOTS_OFFSET = PAGE
#: The header page's words the routines use (ring.format writes the rest of it), each on
#: a cache line of its own:
#: - ``HDR_DEADLINE`` (u64, TSC): a writer that finds its buffer full waits for the reader
#:   while ``rdtsc`` is below it. The reader pushes it ahead while it is alive and
#:   draining (lossless mode) and stores 0 for "never wait" (drop mode, or the end);
#: - ``HDR_BELL`` (u32 futex word): a writer bumps it when its buffer crosses a half or is
#:   full, and wakes the reader if ``HDR_SLEEPING`` says it sleeps on it;
#: - ``HDR_READER_PID`` (u32): a waiting writer checks it still exists (``kill(pid, 0)``),
#:   so the death of textpoke ends every wait at once rather than at the deadline.
HDR_DEADLINE = 64
HDR_BELL = 128
HDR_SLEEPING = 192
HDR_READER_PID = 256
#: Calls of this session traced entry-only (graph mode): the shadow table had no room for
#: the thread (u64), the thread's shadow stack was full (u64).
HDR_SHADOW_NO_THREAD = 320
HDR_SHADOW_FULL = 328
#: A slot's site word: the site id in the low bits, the record's kind above them.
KIND_SHIFT = 30
SITE_MASK = (1 << KIND_SHIFT) - 1


class RecordKind(enum.IntEnum):
    """What a record says happened (the top bits of a slot's site word)."""

    CALL = 0  # a call; no exit record follows (entry-only tracing, a call site, no room to hook it)
    EXIT = 1  # a traced function returned (its ENTER is the innermost open one of the thread)
    UNWOUND = 2  # a traced function's frame was left without a return (longjmp, exception, exit)
    ENTER = 3  # a traced function was entered and hooked: its EXIT or UNWOUND follows


__all__ = [name for name in dir() if name.isupper() or name == "RecordKind"]
