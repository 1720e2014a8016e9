"""The in-flight site table: which sites are being patched, and to what.

The layout is a contract with the resident SIGTRAP handler (machine code in the
target that reads this same memory), so it is spelled out here and in
DEVELOPERS.md, and the handler generator mirrors :func:`table_slot`:

- ``capacity`` entries (a power of two) of 16 bytes each, no header;
- entry = two little-endian u64: ``addr`` then ``insn``; ``addr == 0`` is empty;
  ``insn`` holds the site's 5 instruction bytes in its low 40 bits (byte 0 of the
  instruction is the least significant byte), the high 24 bits are zero;
- home slot ``((addr * 0x9E3779B97F4A7C15) mod 2**64) >> (64 - log2(capacity))``
  (Fibonacci hashing: the high bits of the product are the well-mixed ones),
  then linear probing ``slot = (slot + 1) & (capacity - 1)`` until ``addr``
  matches or is 0.

Concurrency: exactly one writer (the tool, which owns the session lock), any
number of readers (trap handlers in target threads) that never lock. So:

- every word is written with one aligned 8-byte store (a numpy ``<u8`` view over
  the buffer, whose alignment is checked), never byte by byte, so a reader sees
  an old or a new word, never a mix;
- a new entry stores ``insn`` before ``addr``: x86 makes stores visible in
  program order, so a reader that finds ``addr`` also finds its whole ``insn``;
- an existing entry is updated by replacing only its ``insn`` word;
- entries are never removed: a thread that trapped long ago may still be about
  to look its site up, and the entry always holds an instruction the site
  legitimately had (old or new), so a late lookup is still right.

Load limit: a publish that would make more than 3/4 of the slots used is
refused (PatchError) before anything is stored, so a probe (which the resident
handler runs with signals arriving at any rate) stays short, and a lookup of an
absent address always meets an empty slot.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .._errors import PatchError, UsageError
from ..x86.insn import SITE_SIZE

#: Multiplier of the table hash: 2**64 / golden ratio, odd (Knuth's Fibonacci hashing).
HASH_MULTIPLIER = 0x9E3779B97F4A7C15
#: Bytes per entry: u64 addr + u64 insn.
ENTRY_SIZE = 16
#: Words per entry, and the word index of each field inside an entry.
_ENTRY_WORDS = 2
_ADDR_WORD = 0
_INSN_WORD = 1
#: Load limit as a fraction num/den: at most 3/4 of the slots are ever used.
MAX_LOAD_NUM = 3
MAX_LOAD_DEN = 4

_U64_MASK = (1 << 64) - 1
_INSN_BITS = 8 * SITE_SIZE
_LE_U64 = np.dtype("<u8")


def table_slot(addr: int, bits: int) -> int:
    """Home slot of ``addr`` in a table of ``2**bits`` entries (the contract hash)."""
    # For bits == 0 the shift is 64 and every address lands in slot 0, which
    # is the right answer for a one-slot table; Python shifts need no special case.
    return ((addr * HASH_MULTIPLIER) & _U64_MASK) >> (64 - bits)


def pack_insn(insn: bytes) -> int:
    """The ``insn`` word of an entry: the 5 bytes little-endian in the low 40 bits."""
    if len(insn) != SITE_SIZE:
        raise UsageError(f"a table entry holds {SITE_SIZE} instruction bytes, not {len(insn)}")
    return int.from_bytes(insn, "little")


def unpack_insn(word: int) -> bytes:
    """Inverse of :func:`pack_insn` (the high 24 bits are ignored, as the handler does)."""
    return (word & ((1 << _INSN_BITS) - 1)).to_bytes(SITE_SIZE, "little")


def _log2_capacity(capacity: int) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise UsageError(f"table capacity must be an int, not {type(capacity).__name__}")
    # Two slots at least: at 3/4 load a one-slot table could hold nothing.
    if capacity < 2 or capacity & (capacity - 1):
        raise UsageError(f"table capacity must be a power of two >= 2, not {capacity}")
    return capacity.bit_length() - 1


class SiteTable:
    """The in-flight table over a caller-owned writable buffer.

    The buffer (shared memory in production, a bytearray in tests) must be at
    least :meth:`size_for` bytes and 8-byte aligned. It is not cleared: a
    zeroed buffer is an empty table, and a buffer that already holds entries
    (a later session on the same target) is adopted with them.
    """

    def __init__(self, buffer: Any, *, capacity: int) -> None:
        self._bits = _log2_capacity(capacity)
        self._capacity = capacity
        size = self.size_for(capacity)
        try:
            raw = memoryview(buffer).cast("B")
        except TypeError as exc:
            raise UsageError(
                f"table buffer must support the buffer protocol, got {type(buffer).__name__}"
            ) from exc
        if raw.readonly:
            raise UsageError("table buffer is read-only")
        if raw.nbytes < size:
            raise UsageError(
                f"table buffer has {raw.nbytes} bytes, {size} needed for {capacity} entries"
            )
        words = np.frombuffer(raw, dtype=_LE_U64, count=capacity * _ENTRY_WORDS)
        # An unaligned word could be split across cache lines, and a reader
        # could then see half of an old value and half of a new one.
        if words.ctypes.data % 8:
            raise UsageError("table buffer must be 8-byte aligned (one store per word)")
        self._words = words
        # Word access for the per-site paths: a memoryview item is several
        # times cheaper than a numpy scalar, and its store is still one
        # aligned 8-byte store (x86-64 is little-endian, so "Q" is "<u8").
        self._q = raw[:size].cast("Q")
        # site -> slot of every entry this instance knows. Entries never move
        # and are never removed, so a hit is always right; a miss (an entry
        # another writer added) falls back to probing, which finds it.
        addrs = words[_ADDR_WORD::_ENTRY_WORDS]
        used = np.flatnonzero(addrs)
        self._slots: dict[int, int] = dict(zip(addrs[used].tolist(), used.tolist()))
        self._count = len(self._slots)

    @staticmethod
    def size_for(capacity: int) -> int:
        """Bytes a table of ``capacity`` entries occupies."""
        _log2_capacity(capacity)
        return capacity * ENTRY_SIZE

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def bits(self) -> int:
        """``log2(capacity)``: the hash keeps this many high bits of the product."""
        return self._bits

    @property
    def max_entries(self) -> int:
        """Most distinct sites the table accepts (3/4 of the capacity)."""
        return self._capacity * MAX_LOAD_NUM // MAX_LOAD_DEN

    @property
    def headroom(self) -> int:
        """How many more *new* sites :meth:`publish` will accept."""
        return self.max_entries - self._count

    def slot_of(self, site: int) -> int:
        """Home slot of ``site`` (where its probe starts)."""
        return table_slot(site, self._bits)

    def _find(self, site: int) -> tuple[int, bool]:
        """Slot holding ``site`` (True) or the empty slot ending its probe (False)."""
        known = self._slots.get(site)
        if known is not None:
            return known, True
        words = self._q
        mask = self._capacity - 1
        slot = table_slot(site, self._bits)
        # The load limit guarantees an empty slot, so the probe ends within
        # capacity steps; the bound only protects against a corrupt buffer.
        for _ in range(self._capacity):
            addr = words[slot * _ENTRY_WORDS + _ADDR_WORD]
            if addr == site:
                self._slots[site] = slot
                return slot, True
            if addr == 0:
                return slot, False
            slot = (slot + 1) & mask
        raise PatchError(
            f"in-flight table of {self._capacity} entries has no empty slot",
            hint="the table memory was overwritten; end the session and start a new one",
        )

    def _store_word(self, index: int, value: int) -> None:
        """One aligned 8-byte store (every table write goes through here)."""
        self._q[index] = value

    def publish(self, site: int, insn: bytes) -> None:
        """Make ``insn`` the instruction a trap at ``site`` emulates."""
        _check_site(site)
        word = pack_insn(insn)
        slot, found = self._find(site)
        base = slot * _ENTRY_WORDS
        if found:
            self._store_word(base + _INSN_WORD, word)
            return
        if self._count >= self.max_entries:
            raise PatchError(
                f"in-flight table is full ({self._count} of {self._capacity} slots, "
                f"limit {self.max_entries}); cannot publish site {site:#x}",
                hint="patch fewer distinct sites per session, or start the session "
                "with a larger table",
            )
        # insn first, addr second: a reader that sees addr sees a complete insn.
        self._store_word(base + _INSN_WORD, word)
        self._store_word(base + _ADDR_WORD, site)
        self._slots[site] = slot
        self._count += 1

    def lookup(self, site: int) -> bytes | None:
        """The instruction published for ``site``, or None if it was never published."""
        if not 0 < site <= _U64_MASK:
            return None  # 0 marks an empty slot; nothing else can be stored
        slot, found = self._find(site)
        if not found:
            return None
        return unpack_insn(self._q[slot * _ENTRY_WORDS + _INSN_WORD])

    def __contains__(self, site: object) -> bool:
        return isinstance(site, int) and self.lookup(site) is not None

    def __len__(self) -> int:
        return self._count

    def entries(self) -> Iterator[tuple[int, bytes]]:
        """``(site, insn)`` for every entry, in slot order."""
        pairs = self._words.reshape(self._capacity, _ENTRY_WORDS)
        for slot in np.flatnonzero(pairs[:, _ADDR_WORD]):
            addr, word = pairs[slot]
            yield int(addr), unpack_insn(int(word))

    def as_dict(self) -> dict[int, bytes]:
        """A snapshot of the table as ``{site: insn}``."""
        return dict(self.entries())


def _check_site(site: int) -> None:
    if isinstance(site, bool) or not isinstance(site, int) or not 0 < site <= _U64_MASK:
        raise UsageError(f"site address must be an int in 1..2**64-1, not {site!r}")


__all__ = [
    "ENTRY_SIZE",
    "HASH_MULTIPLIER",
    "MAX_LOAD_DEN",
    "MAX_LOAD_NUM",
    "SiteTable",
    "pack_insn",
    "table_slot",
    "unpack_insn",
]
