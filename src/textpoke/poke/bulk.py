"""The batch protocol over arrays: protocol.apply_batch's steps, each done for the whole batch at once.

:func:`textpoke.poke.protocol.apply_batch` is the specification, one site at a
time, and stays the reference: ``tests/poke/test_bulk.py`` runs it and
:func:`apply_patches` on the same fake text and compares the bytes, the table,
the result and every error. What differs is only how the work is done, so that
100,000 sites cost a few microseconds each:

- the batch is columns (:class:`PatchArray`: sites u64, old and new (N, 5) u8),
  checked in bulk (what :class:`Patch` checks per value);
- sites are grouped in *runs*: sorted sites whose pages touch (the next site
  starts at most one page after the page where the last one ends), so every byte
  between two sites of a run lies in a page that holds a site byte (readable and
  writable exactly when the sites are; no page without a site is ever written,
  so no extra page of the program's text is copied on write);
- each step reads each run once, and writes each run once: one ``write`` of the
  bytes from the run's first to its last changed byte, where the bytes between
  sites are the ones read back from the target just before, compared with what
  verification read (a difference stops the batch: someone else writes this code);
  an int3 between sites (someone else's breakpoint) is never written, not even with
  itself: the write goes around it (:func:`_segments`).
  Sites where that is not wanted (``coalesce`` False: a writable mapping, whose
  bytes the program itself may change at any time) are written on their own;
- the table is read and written with :meth:`SiteTable.lookup_many` and
  :meth:`SiteTable.publish_many` (each new entry's insn stored before its addr).

The invariants are the reference's: every old byte verified before any write or
publish; every entry published before any int3; int3s, tails and heads each in
one step followed by one sync (three in all); a failure in the int3 step rolled
back; after that, never.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol, overload

import numpy as np

from .._errors import ForeignTrap, PatchError, SiteError, SiteMismatch, UsageError
from ..x86.insn import INT3_BYTE, SITE_SIZE, decode_site, site_insns_ok
from .protocol import _ADDRESS_END, BatchResult, Patch, Step, TextAccess, _foreign_text, _notify

PAGE_SHIFT = 12
_U8 = np.uint8
_U64 = np.uint64


class BulkTable(Protocol):
    """What :func:`apply_patches` needs of :class:`textpoke.poke.table.SiteTable`."""

    def lookup_many(self, sites: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def publish_many(self, sites: np.ndarray, insns: np.ndarray) -> int: ...

    @property
    def headroom(self) -> int: ...


def insn_rows(insns: Iterable[bytes]) -> np.ndarray:
    """5-byte instructions as an (N, 5) u8 array, the layout of PatchArray's columns."""
    return np.frombuffer(b"".join(insns), dtype=_U8).reshape(-1, SITE_SIZE)


def _rows(value: object, count: int, name: str) -> np.ndarray:
    rows = np.asarray(value)
    if rows.dtype != _U8 or rows.shape != (count, SITE_SIZE):
        raise UsageError(f"patch {name} must be an ({count}, {SITE_SIZE}) u8 array, not {rows.dtype} {rows.shape}")
    return rows


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    if array.flags.writeable:
        array = array.copy() if array.base is not None else array
        array.flags.writeable = False
    return array


class PatchArray:
    """A batch of patches as columns; a sequence of :class:`Patch` values to its users.

    ``sites`` (N,) u64, ``old`` and ``new`` (N, 5) u8, read-only. Built from arrays
    (:meth:`build`, checked as :class:`Patch` checks one value: every site in
    1..2**64-5, every instruction nop5, call rel32 or jmp rel32) or from Patch
    values (:meth:`of`, already checked)."""

    __slots__ = ("sites", "old", "new")

    def __init__(self, sites: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        """Unchecked: use :meth:`build` or :meth:`of`."""
        self.sites = _frozen(sites)
        self.old = _frozen(old)
        self.new = _frozen(new)

    @classmethod
    def build(cls, sites: Sequence[int] | np.ndarray, old: np.ndarray, new: np.ndarray) -> PatchArray:
        """From arrays, checked (UsageError, SiteError as :class:`Patch` raises them)."""
        try:
            addresses = np.asarray(sites, dtype=_U64)
        except (OverflowError, TypeError, ValueError) as exc:
            raise UsageError(f"patch sites must be addresses (ints in 1..2**64-5): {exc}") from exc
        if addresses.ndim != 1:
            raise UsageError(f"patch sites must be one-dimensional, not shape {addresses.shape}")
        count = len(addresses)
        old_rows, new_rows = _rows(old, count, "old"), _rows(new, count, "new")
        bad = np.flatnonzero((addresses == 0) | (addresses > _U64(_ADDRESS_END - SITE_SIZE)))
        if len(bad):
            raise UsageError(f"patch site {int(addresses[bad[0]]):#x} is not a valid address")
        for rows in (old_rows, new_rows):
            wrong = np.flatnonzero(~site_insns_ok(rows))
            if len(wrong):
                decode_site(int(addresses[wrong[0]]), rows[wrong[0]].tobytes())  # raises the SiteError
        return cls(addresses, old_rows, new_rows)

    @classmethod
    def of(cls, patches: Iterable[Patch] | PatchArray) -> PatchArray:
        """``patches`` as columns: a PatchArray as it is, else Patch values (UsageError for anything else)."""
        if isinstance(patches, PatchArray):
            return patches
        items = patches if isinstance(patches, (list, tuple)) else list(patches)
        for patch in items:
            if not isinstance(patch, Patch):
                raise UsageError(f"apply_batch takes Patch values, not {type(patch).__name__}")
        count = len(items)
        sites = np.fromiter((p.site for p in items), dtype=_U64, count=count)
        return cls(sites, insn_rows(p.old for p in items), insn_rows(p.new for p in items))

    @classmethod
    def empty(cls) -> PatchArray:
        return cls(np.zeros(0, _U64), np.zeros((0, SITE_SIZE), _U8), np.zeros((0, SITE_SIZE), _U8))

    def __len__(self) -> int:
        return len(self.sites)

    @overload
    def __getitem__(self, index: int) -> Patch: ...

    @overload
    def __getitem__(self, index: slice | np.ndarray) -> PatchArray: ...

    def __getitem__(self, index: int | slice | np.ndarray) -> Patch | PatchArray:
        if isinstance(index, (int, np.integer)):
            i = int(index)
            return Patch(site=int(self.sites[i]), old=self.old[i].tobytes(), new=self.new[i].tobytes())
        return PatchArray(self.sites[index], self.old[index], self.new[index])

    def __iter__(self) -> Iterator[Patch]:
        old, new = self.old.tobytes(), self.new.tobytes()
        for i, site in enumerate(self.sites.tolist()):
            yield Patch(site=site, old=old[SITE_SIZE * i : SITE_SIZE * (i + 1)],
                        new=new[SITE_SIZE * i : SITE_SIZE * (i + 1)])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PatchArray):
            return NotImplemented
        return (np.array_equal(self.sites, other.sites) and np.array_equal(self.old, other.old)
                and np.array_equal(self.new, other.new))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PatchArray({len(self)} sites)"

    @property
    def changes(self) -> np.ndarray:
        """Per patch: does it change its site (old != new)?"""
        return (self.old != self.new).any(axis=1)

    def reverted(self) -> PatchArray:
        """The batch that undoes this one (old and new swapped), in the same order."""
        return PatchArray(self.sites, self.new, self.old)


# ---------------------------------------------------------------------------
# Runs of nearby sites
# ---------------------------------------------------------------------------


def _breaks(sorted_sites: np.ndarray) -> np.ndarray:
    """Per sorted site after the first: does it start a new run (its page does not
    touch the page where the site before it ends)?"""
    pages = sorted_sites >> _U64(PAGE_SHIFT)
    ends = (sorted_sites + _U64(SITE_SIZE - 1)) >> _U64(PAGE_SHIFT)
    return pages[1:] > ends[:-1] + _U64(1)


class _Image:
    """The bytes of every run of a batch's sites as the batch last read or wrote them:
    one buffer, the runs one after the other."""

    def __init__(self, text: TextAccess, sites: np.ndarray) -> None:
        count = len(sites)
        order = np.argsort(sites, kind="stable")
        ordered = sites[order].astype(np.int64)  # user-space addresses: < 2**63
        first = np.concatenate(([0], np.flatnonzero(_breaks(sites[order])) + 1)).astype(np.int64)
        if not count:
            first = first[:0]
        last = np.append(first[1:] - 1, count - 1) if count else first
        self.starts = ordered[first]
        sizes = ordered[last] + SITE_SIZE - self.starts
        self.bases = np.cumsum(sizes) - sizes
        #: Per batch site: its run, and where its first byte is in the buffer.
        self.run = np.empty(count, dtype=np.int64)
        self.run[order] = np.repeat(np.arange(len(first)), np.diff(np.append(first, count)))
        self.offsets = self.bases[self.run] + sites.astype(np.int64) - self.starts[self.run]
        chunks = [_read(text, start, size) for start, size in zip(self.starts.tolist(), sizes.tolist())]
        self.buffer = np.frombuffer(bytearray(b"".join(chunks)), dtype=_U8)

    def sites(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The 5 bytes of the given batch sites, as (N, 5) u8."""
        return self.buffer[self.offsets[index][:, None] + np.arange(SITE_SIZE)]


def _read(text: TextAccess, start: int, length: int) -> bytes:
    data = text.read(start, length)
    if len(data) != length:
        raise PatchError(f"short read at {start:#x}: {len(data)} of {length} bytes")
    return bytes(data)


def read_sites(text: TextAccess, sites: np.ndarray) -> np.ndarray:
    """The 5 bytes of every site (u64 array), (N, 5) u8: one read per run of nearby sites."""
    return _Image(text, np.asarray(sites, dtype=_U64)).sites()


class _Writes:
    """The work sites of a batch grouped into write runs (one write each per step): runs of
    the image, split further between two work sites whose pages do not touch (sites left
    out between them) and around a site that may not share a write."""

    def __init__(self, image: _Image, sites: np.ndarray, work: np.ndarray, coalesce: np.ndarray) -> None:
        self.work = work[np.argsort(sites[work], kind="stable")]  # batch indexes, by address
        address = sites[self.work].astype(np.int64)
        self.address = address
        self.offsets = image.offsets[self.work]
        alone = ~coalesce[self.work]
        cut = ((np.diff(image.run[self.work]) != 0) | alone[1:] | alone[:-1]
               | ((address[1:] >> PAGE_SHIFT) > ((address[:-1] + SITE_SIZE - 1) >> PAGE_SHIFT) + 1))
        self.first = np.concatenate(([0], np.flatnonzero(cut) + 1)).astype(np.int64)[: len(address)]
        self.last = np.append(self.first[1:] - 1, len(address) - 1) if len(address) else self.first

    def runs(self, lo: int, hi: int) -> list[tuple[int, int, int, np.ndarray]]:
        """Per run, for writing bytes [lo, hi) of each site: (address, buffer offset,
        length, the batch indexes of its sites)."""
        return [(int(self.address[a]) + lo, int(self.offsets[a]) + lo, int(self.offsets[b] - self.offsets[a]) + hi - lo,
                 self.work[a : b + 1]) for a, b in zip(self.first.tolist(), self.last.tolist())]


# ---------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------


def apply_patches(
    patches: Iterable[Patch] | PatchArray,
    *,
    text: TextAccess,
    sync: Callable[[], None],
    table: BulkTable,
    on_step: Callable[[Step], None] | None = None,
    resume: bool = False,
    skip_foreign: bool = False,
    coalesce: bool | np.ndarray = True,
    on_verified: Callable[[PatchArray], None] | None = None,
) -> BatchResult:
    """:func:`textpoke.poke.protocol.apply_batch` in bulk: the same steps, the same
    result and errors (see its docstring), each step done for the whole batch.

    0. verify: sites sorted once (overlaps refused), every site read (one read per
       run), compared, in-flight entries looked up, room checked; nothing written;
       then ``on_verified(batch without foreign sites)`` (the session's ledger: before
       anything is published) and Step.VERIFIED;
    1. publish every new instruction (publish_many); Step.PUBLISHED;
    2. int3 over every first byte: per run, read back the run (it must hold what
       verification read), one write, read back; sync; rolled back on failure;
    3. new bytes 1..4 likewise; sync;  4. new byte 0 likewise; sync.

    ``coalesce``: per site (batch order), or for all, whether its bytes may be
    written in one write with its neighbours' and the code between them."""
    batch = PatchArray.of(patches)
    count = len(batch)
    sites = batch.sites
    if count:
        ordered = np.sort(sites)
        close = np.flatnonzero(ordered[1:] - ordered[:-1] < _U64(SITE_SIZE))
        if len(close):
            # Overlapping patches would write one instruction's bytes into another;
            # a duplicate site (distance 0) would be published twice.
            first, second = int(ordered[close[0]]), int(ordered[close[0] + 1])
            raise SiteError(f"patches at {first:#x} and {second:#x} overlap",
                            hint="give each site once; sites are 5 bytes long")
    image = _Image(text, sites)
    current = image.sites()
    found, entry = table.lookup_many(sites)
    old, new = batch.old, batch.new
    trapped = current[:, 0] == INT3_BYTE
    foreign = trapped & ~found
    in_flight = trapped & found
    entry_ok = in_flight & ((entry == old).all(axis=1) | (entry == new).all(axis=1))
    holds_old = ~trapped & (current == old).all(axis=1)
    holds_new = ~trapped & (current == new).all(axis=1)
    settled = holds_old | (holds_new & resume)
    problem = (in_flight & ~entry_ok) | (~trapped & ~settled)
    foreign_sites = tuple(sites[foreign].tolist())
    if problem.any():
        wrong = np.flatnonzero(problem)
        shown = "; ".join(_problem(int(sites[i]), current[i], entry[i], old[i], bool(in_flight[i]))
                          for i in wrong[:8])
        more = f" (and {len(wrong) - 8} more)" if len(wrong) > 8 else ""
        also = f"; {_foreign_text(foreign_sites, count)}" if foreign_sites else ""
        raise SiteMismatch(
            f"{len(wrong)} of {count} sites do not hold the expected bytes, "
            f"nothing was written: {shown}{more}{also}"
        )
    if foreign_sites and not skip_foreign:
        raise ForeignTrap(f"{_foreign_text(foreign_sites, count)}; nothing was written", sites=foreign_sites)
    changes = (old != new).any(axis=1)
    write = entry_ok | (holds_old & changes)
    effective = np.where(in_flight[:, None], entry, current)
    new_sites = int(np.count_nonzero(write & ~found))
    if new_sites > table.headroom:
        raise PatchError(
            f"the in-flight table has room for {table.headroom} more sites, "
            f"this batch needs {new_sites}; nothing was written",
            hint="patch fewer distinct sites per session, or start the session "
            "with a larger table",
        )
    if on_verified is not None:
        on_verified(batch[~foreign] if foreign.any() else batch)
    _notify(on_step, Step.VERIFIED)
    skipped = ~write & ~foreign
    # Skipped sites: an entry an interrupted batch left stale goes back to what the site holds.
    stale = skipped & found & (entry != effective).any(axis=1)
    if stale.any():
        table.publish_many(sites[stale], effective[stale])
    skipped_sites = tuple(sites[skipped].tolist())
    work = np.flatnonzero(write)
    if not len(work):
        return BatchResult(patched=(), skipped=skipped_sites, syncs=0, foreign=foreign_sites)

    table.publish_many(sites[work], new[work])
    _notify(on_step, Step.PUBLISHED)
    flags = np.broadcast_to(np.asarray(coalesce, dtype=bool), (count,))
    writes = _Writes(image, sites, work, flags)
    _int3_step(batch, image, writes, current, effective, text=text, sync=sync, table=table)
    _notify(on_step, Step.INT3)
    _step(batch, image, writes, 1, SITE_SIZE, "tail", text=text)
    sync()
    _notify(on_step, Step.TAIL)
    _step(batch, image, writes, 0, 1, "the first byte", text=text)
    sync()
    _notify(on_step, Step.HEAD)
    return BatchResult(patched=tuple(sites[work].tolist()), skipped=skipped_sites, syncs=3, foreign=foreign_sites)


def _problem(site: int, current: np.ndarray, entry: np.ndarray, old: np.ndarray, in_flight: bool) -> str:
    if in_flight:
        return f"{site:#x} is in flight to {entry.tobytes().hex(' ')}, expected {old.tobytes().hex(' ')}"
    return f"{site:#x} holds {current.tobytes().hex(' ')}, expected {old.tobytes().hex(' ')}"


def _int3_step(batch: PatchArray, image: _Image, writes: _Writes, current: np.ndarray, effective: np.ndarray, *,
               text: TextAccess, sync: Callable[[], None], table: BulkTable) -> None:
    """Step 2: int3 over every first byte, read back, sync; any failure rolled back
    (first bytes restored one site at a time, entries republished, sync), as in the reference."""
    attempted: list[np.ndarray] = []
    try:
        _step(batch, image, writes, 0, 1, "int3", text=text, attempted=attempted)
        sync()
    except BaseException as exc:  # also KeyboardInterrupt: undo before leaving
        for index in attempted:
            for i in index.tolist():
                site = int(batch.sites[i])
                try:
                    text.write(site, current[i, :1].tobytes())
                except Exception as error:  # keep restoring the others
                    exc.add_note(f"rollback: could not restore {site:#x}: {error}")
        table.publish_many(batch.sites[writes.work], effective[writes.work])
        try:
            sync()
        except Exception as error:
            exc.add_note(f"rollback: sync failed: {error}")
        raise


def _step(batch: PatchArray, image: _Image, writes: _Writes, lo: int, hi: int, what: str, *, text: TextAccess,
          attempted: list[np.ndarray] | None = None) -> None:
    """Write bytes [lo, hi) of every work site's new state (int3 for step 2, else
    ``new``), one write per run, then read every run back (the caller syncs).

    Each run is read just before its write and must hold what the batch read and
    wrote so far (its image): the bytes between sites are written back only as the
    target holds them. Then every run must read back as its image: a site that does
    not is named as the reference names it, in batch order."""
    buffer = image.buffer
    runs = writes.runs(lo, hi)
    for address, offset, length, index in runs:
        expected = buffer[offset : offset + length]
        now = _read(text, address, length)
        if now != expected.tobytes():
            _changed(address, np.frombuffer(now, dtype=_U8), expected, what=f"before {what} was written")
        updated = expected.copy()
        at = image.offsets[index] - offset + lo
        if what == "int3":
            updated[at] = INT3_BYTE
        else:
            updated[at[:, None] + np.arange(hi - lo)] = batch.new[index, lo:hi]
        if attempted is not None:
            attempted.append(index)
        for start, end in _segments(expected, updated, image.offsets[index] - offset):
            text.write(address + start, updated[start:end].tobytes())
        buffer[offset : offset + length] = updated
    back = buffer.copy()
    for address, offset, length, _ in runs:
        back[offset : offset + length] = np.frombuffer(_read(text, address, length), dtype=_U8)
    if np.array_equal(back, buffer):
        return
    work = np.sort(writes.work)  # batch order, as the reference reads back
    columns = image.offsets[work][:, None] + np.arange(SITE_SIZE)
    got, want = back[columns], buffer[columns]
    bad = np.flatnonzero((got != want).any(axis=1))
    if len(bad):
        others = f" ({len(bad) - 1} other sites too)" if len(bad) > 1 else ""
        raise PatchError(
            f"site {int(batch.sites[work[bad[0]]]):#x} reads back {got[bad[0]].tobytes().hex(' ')} after writing "
            f"{what}, expected {want[bad[0]].tobytes().hex(' ')}{others}",
            hint="another program (a debugger, another patcher) writes this code",
        )
    for address, offset, length, _ in runs:
        _changed(address, back[offset : offset + length], buffer[offset : offset + length],
                 what=f"after {what} was written")


def _segments(expected: np.ndarray, updated: np.ndarray, ours: np.ndarray) -> list[tuple[int, int]]:
    """The parts of a run to write, [start, end): all of it but any int3 byte outside the
    batch's sites being written (``ours``: where their first bytes are in the run): someone
    else's breakpoint (a debugger's, a uprobe's) is never written over, not even with itself
    (were it removed meanwhile, writing it back would leave an int3 nothing handles). Parts
    that change nothing are left out too."""
    foreign = expected == INT3_BYTE
    inside = (ours[:, None] + np.arange(SITE_SIZE)).ravel()
    foreign[inside[(inside >= 0) & (inside < len(expected))]] = False
    if not foreign.any():
        return [(0, len(expected))]
    keep = np.concatenate(([False], ~foreign, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(keep))
    parts = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
    return [(a, b) for a, b in parts if not np.array_equal(expected[a:b], updated[a:b])]


def _changed(address: int, got: np.ndarray, expected: np.ndarray, *, what: str) -> None:
    """PatchError naming the first byte of a run that is not what the batch left there."""
    differ = np.flatnonzero(got != expected)
    if not len(differ):
        return
    first = int(differ[0])
    raise PatchError(
        f"the code at {address + first:#x} changed {what}: it holds {int(got[first]):02x}, "
        f"textpoke read {int(expected[first]):02x} there; nothing more was written",
        hint="another program (a debugger, a JIT, another patcher) writes this code",
    )


__all__ = ["BulkTable", "PatchArray", "apply_patches", "read_sites"]
