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

Bulk (:meth:`SiteTable.lookup_many`, :meth:`SiteTable.publish_many`): the same
contract over numpy arrays, one probe step of every pending site per round. A
bulk publish stores every new entry's ``insn`` word, then every new entry's
``addr`` word, so each entry still has its ``insn`` before its ``addr``; new
entries only fill empty slots, so no existing entry's probe path changes. The
slots it picks may differ from one-at-a-time publishing in another order, but
the set of used slots is the same (linear probing fills the same slots whatever
the order) and every lookup, of a present or an absent address, answers the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


def table_slots(addrs: np.ndarray, bits: int) -> np.ndarray:
    """:func:`table_slot` of every address of a u64 array (products wrap mod 2**64, as in C)."""
    if not 1 <= bits <= 63:
        raise UsageError(f"a table of 2**{bits} entries has no bulk hash")
    return (np.asarray(addrs, dtype=np.uint64) * np.uint64(HASH_MULTIPLIER)) >> np.uint64(64 - bits)


def pack_insns(rows: np.ndarray) -> np.ndarray:
    """:func:`pack_insn` of every row of an (N, 5) u8 array: the ``insn`` words (u64)."""
    rows = np.asarray(rows, dtype=np.uint8)
    if rows.ndim != 2 or rows.shape[1] != SITE_SIZE:
        raise UsageError(f"instructions must be an (N, {SITE_SIZE}) byte array, not shape {rows.shape}")
    wide = np.zeros((len(rows), 8), dtype=np.uint8)
    wide[:, :SITE_SIZE] = rows
    return wide.view(_LE_U64).ravel()


def unpack_insns(words: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_insns`: (N, 5) u8 (the high 24 bits are ignored)."""
    words = np.ascontiguousarray(words, dtype=_LE_U64)
    return words.view(np.uint8).reshape(-1, 8)[:, :SITE_SIZE].copy()


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

    ``populated(start, end)``, if given, names the byte ranges of the buffer
    within [start, end) that may hold entries (the rest reads as zeros): the
    scans of the whole table (its count, :meth:`entry_arrays`) read only those.
    Over a memfd's mapping that matters: reading a hole of shared memory through
    a mapping allocates it, so a scan would give the target's region every page
    of a table most of which it never uses (Resident passes SEEK_DATA ranges).
    """

    def __init__(self, buffer: Any, *, capacity: int,
                 populated: Callable[[int, int], Sequence[tuple[int, int]]] | None = None) -> None:
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
        # site -> slot of entries this instance found or stored one at a time.
        # Entries never move and are never removed, so a hit is always right; a
        # miss falls back to probing, which finds it. (Filled as sites are met,
        # not here: an adopted table of 100,000 entries opens in microseconds.)
        self._slots: dict[int, int] = {}
        self._populated = populated
        self._count = int(np.count_nonzero(self._addr_words()))

    def _spans(self) -> list[tuple[int, int]]:
        """Slot ranges [first, end) that may hold entries (all of them without ``populated``)."""
        if self._populated is None:
            return [(0, self._capacity)]
        return [(lo // ENTRY_SIZE, -(-hi // ENTRY_SIZE))
                for lo, hi in self._populated(0, self._capacity * ENTRY_SIZE) if hi > lo]

    def _addr_words(self) -> np.ndarray:
        """The ``addr`` word of every slot, read where entries may be (a copy; zeros elsewhere)."""
        spans = self._spans()
        if spans == [(0, self._capacity)]:
            return self._words[_ADDR_WORD::_ENTRY_WORDS].copy()
        out = np.zeros(self._capacity, dtype=_LE_U64)
        for first, end in spans:
            out[first:end] = self._words[first * _ENTRY_WORDS + _ADDR_WORD : end * _ENTRY_WORDS : _ENTRY_WORDS]
        return out

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

    # -- bulk ------------------------------------------------------------------------
    def find_many(self, sites: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_find` of every site of a u64 array, probing all at once:
        (slot, found); for a site not found, the empty slot that ends its probe."""
        sites = np.asarray(sites, dtype=np.uint64)
        count = len(sites)
        slot = table_slots(sites, self._bits).astype(np.int64) if count else np.zeros(0, np.int64)
        found = np.zeros(count, dtype=bool)
        addrs = self._words[_ADDR_WORD::_ENTRY_WORDS]
        mask = self._capacity - 1
        pending = np.arange(count)
        # The load limit guarantees an empty slot on every probe path; the bound
        # only protects against a corrupt buffer (as in _find).
        for _ in range(self._capacity):
            if not len(pending):
                return slot, found
            at = addrs[slot[pending]]
            hit = at == sites[pending]
            found[pending[hit]] = True
            pending = pending[~hit & (at != 0)]
            slot[pending] = (slot[pending] + 1) & mask
        if len(pending):
            raise PatchError(
                f"in-flight table of {self._capacity} entries has no empty slot",
                hint="the table memory was overwritten; end the session and start a new one",
            )
        return slot, found

    def lookup_many(self, sites: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`lookup` of every site of a u64 array: (found, insns as (N, 5) u8;
        rows of sites not found are zero)."""
        sites = np.asarray(sites, dtype=np.uint64)
        slot, found = self.find_many(sites)
        words = np.zeros(len(sites), dtype=_LE_U64)
        words[found] = self._words[slot[found] * _ENTRY_WORDS + _INSN_WORD]
        return found, unpack_insns(words)

    def publish_many(self, sites: np.ndarray, insns: np.ndarray) -> int:
        """:meth:`publish` of every (site, insn): distinct sites (u64 array), (N, 5) u8
        instructions. Checked whole before any store (PatchError if the new entries
        exceed the load limit, UsageError for a zero or repeated site). Existing
        entries get their ``insn`` word replaced; then every new entry's ``insn``
        is stored, then every new entry's ``addr``. Returns how many were new."""
        sites = np.asarray(sites, dtype=np.uint64)
        words = pack_insns(insns)
        if len(words) != len(sites):
            raise UsageError(f"{len(sites)} sites but {len(words)} instructions")
        if not len(sites):
            return 0
        if not sites.all():
            raise UsageError("site address must be an int in 1..2**64-1, not 0")
        ordered = np.sort(sites)
        if (ordered[1:] == ordered[:-1]).any():
            raise UsageError("a bulk publish names a site twice")
        slot, found = self.find_many(sites)
        fresh = np.flatnonzero(~found)
        if self._count + len(fresh) > self.max_entries:
            raise PatchError(
                f"in-flight table is full ({self._count} of {self._capacity} slots, "
                f"limit {self.max_entries}); cannot publish {len(fresh)} more sites",
                hint="patch fewer distinct sites per session, or start the session "
                "with a larger table",
            )
        table = self._words
        table[slot[found] * _ENTRY_WORDS + _INSN_WORD] = words[found]  # one aligned store each
        if len(fresh):
            final = self._place(slot[fresh])
            # insn words first, then addr words: a reader that finds addr finds insn.
            table[final * _ENTRY_WORDS + _INSN_WORD] = words[fresh]
            table[final * _ENTRY_WORDS + _ADDR_WORD] = sites[fresh]
            self._count += len(fresh)
        return len(fresh)

    def _place(self, start: np.ndarray) -> np.ndarray:
        """Slots for new entries whose probes end at the empty slots ``start``: each
        takes the first slot from its start that is empty and not taken by another
        of them (ties go to the first in order), so every slot from an entry's home
        to its own is used: linear probing's invariant."""
        used = self._addr_words() != 0
        final = np.empty(len(start), dtype=np.int64)
        at = start.astype(np.int64)
        pending = np.arange(len(start))
        mask = self._capacity - 1
        while len(pending):
            free = ~used[at[pending]]
            slots, first = np.unique(at[pending[free]], return_index=True)
            winners = pending[free][first]
            final[winners] = slots
            used[slots] = True
            keep = np.ones(len(pending), dtype=bool)
            keep[np.flatnonzero(free)[first]] = False
            pending = pending[keep]
            at[pending] = (at[pending] + 1) & mask
        return final

    def entry_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every entry as arrays, in slot order: (sites u64, insns (N, 5) u8)."""
        pairs = self._words.reshape(self._capacity, _ENTRY_WORDS)
        used = np.flatnonzero(self._addr_words())
        return pairs[used, _ADDR_WORD].copy(), unpack_insns(pairs[used, _INSN_WORD])

    def entries(self) -> Iterator[tuple[int, bytes]]:
        """``(site, insn)`` for every entry, in slot order."""
        sites, insns = self.entry_arrays()
        raw = insns.tobytes()
        for i, site in enumerate(sites.tolist()):
            yield site, raw[SITE_SIZE * i : SITE_SIZE * (i + 1)]

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
    "pack_insns",
    "table_slot",
    "table_slots",
    "unpack_insn",
    "unpack_insns",
]
