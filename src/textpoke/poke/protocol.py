"""The batch protocol: rewrite any number of 5-byte sites with three syncs.

This is ``text_poke_bp_batch()`` (arch/x86/kernel/alternative.c) for a process:
the table of :mod:`textpoke.poke.table` plays ``bp_desc``, the handler of
:mod:`textpoke.poke.spec` plays ``poke_int3_handler()``, and ``sync()`` plays
``text_poke_sync()`` (every thread of the target serializes). One function per
step below; each names the other half of the ordering it relies on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .._errors import ForeignTrap, PatchError, SiteError, SiteMismatch, UsageError
from ..x86.insn import INT3, INT3_BYTE, SITE_SIZE, decode_site

#: Reads of sites closer than this are merged into one read of the span. Text
#: between two readable sites less than a page apart is itself readable (a hole
#: in a mapping is whole pages), and reading code has no side effect.
_READ_GAP = 64

_ADDRESS_END = 1 << 64


@dataclass(frozen=True)
class Patch:
    """Rewrite the 5-byte instruction at ``site`` from ``old`` to ``new``.

    Both must be a whole site instruction (nop5, call rel32, jmp rel32): the
    trap handler emulates ``new``, and a revert makes ``old`` the new one.
    """

    site: int
    old: bytes
    new: bytes

    def __post_init__(self) -> None:
        if isinstance(self.site, bool) or not isinstance(self.site, int):
            raise UsageError(f"patch site must be an int, not {self.site!r}")
        # Address 0 is the table's empty marker, and the 5 bytes must not wrap.
        if not 0 < self.site <= _ADDRESS_END - SITE_SIZE:
            raise UsageError(f"patch site {self.site:#x} is not a valid address")
        for name in ("old", "new"):
            value = getattr(self, name)
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise UsageError(f"patch {name} must be bytes, not {type(value).__name__}")
            value = bytes(value)
            if len(value) != SITE_SIZE:
                raise UsageError(
                    f"patch at {self.site:#x}: {name} has {len(value)} bytes, "
                    f"a site is {SITE_SIZE}"
                )
            object.__setattr__(self, name, value)  # frozen: normalize once, here
            decode_site(self.site, value)  # SiteError unless nop5/call/jmp

    @property
    def changes(self) -> bool:
        return self.old != self.new

    def reverted(self) -> Patch:
        """The patch that undoes this one."""
        return Patch(site=self.site, old=self.new, new=self.old)


def revert_patches(patches: Iterable[Patch]) -> list[Patch]:
    """The batch that undoes ``patches`` (old and new swapped), in the same order."""
    return [patch.reverted() for patch in patches]


class Step(enum.Enum):
    """Points between the steps of :func:`apply_batch` (passed to ``on_step``)."""

    VERIFIED = "verified"  # step 0 done: every site matched, nothing written
    PUBLISHED = "published"  # step 1 done: table holds the new insns, text unchanged
    INT3 = "int3"  # step 2 done and synced: every site starts with int3
    TAIL = "tail"  # step 3 done and synced: int3 + new bytes 1..4
    HEAD = "head"  # step 4 done and synced: the new instruction, whole


class TextAccess(Protocol):
    """The target's code: reads and writes that bypass page protection.

    An implementation may also offer ``write_many(writes: Sequence[tuple[int,
    bytes]]) -> None``; :func:`apply_batch` then hands it each step's writes at
    once (so it can batch them into fewer syscalls).
    """

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class InFlightTable(Protocol):
    """What the protocol needs of :class:`textpoke.poke.table.SiteTable`."""

    def lookup(self, site: int) -> bytes | None: ...

    def publish(self, site: int, insn: bytes) -> None: ...

    @property
    def headroom(self) -> int: ...


@dataclass(frozen=True)
class BatchResult:
    """What :func:`apply_batch` did, sites in the order the batch gave them."""

    patched: tuple[int, ...]  # sites written (each with int3, tail, head)
    skipped: tuple[int, ...]  # sites needing no write: they hold ``new`` already
    syncs: int  # 3 if anything was written, else 0
    #: Sites left alone because they hold someone else's int3 (``skip_foreign``).
    foreign: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Planned:
    """A verified patch with what step 0 found at its site."""

    patch: Patch
    current: bytes  # the bytes read in step 0
    effective: bytes  # the instruction a thread executes there now (see _verify)
    write: bool  # False: the site already holds ``new`` whole; nothing to write

    @property
    def site(self) -> int:
        return self.patch.site


def apply_batch(
    patches: Iterable[Patch],
    *,
    text: TextAccess,
    sync: Callable[[], None],
    table: InFlightTable,
    on_step: Callable[[Step], None] | None = None,
    resume: bool = False,
    skip_foreign: bool = False,
) -> BatchResult:
    """Apply every patch of the batch, with three syncs in total.

    0. verify (:func:`_verify`): every patch is a whole 5-byte instruction, no
       two overlap, the table has room, and the current bytes of *every* site
       match ``old``, all read before the first write; otherwise SiteMismatch
       (or SiteError/PatchError) and nothing is written or published. A site
       whose first byte is an int3 the table does not know (a debugger's
       breakpoint, a uprobe's) is foreign: the batch is refused (ForeignTrap,
       naming every such site), or, with ``skip_foreign``, goes on without it
       (``BatchResult.foreign``); one the table knows is a site an interrupted batch left
       in flight, whose effective instruction is its table entry: it is
       accepted if that entry is ``old`` or ``new``, and this batch finishes it.
       A site holding ``new`` already is skipped when ``old == new``, and also
       when ``old != new`` if ``resume`` is set (finishing an interrupted batch
       whose earlier sites were completed); otherwise it is a mismatch.
    1. publish (:func:`_publish`) each site's new instruction in the table.
    2. int3 (:func:`_poke_int3`) over each site's first byte; read back; sync.
    3. tail (:func:`_poke_tail`): new bytes 1..4 of each site; read back; sync.
    4. head (:func:`_poke_head`): new byte 0 of each site; read back; sync.

    Entries stay in the table afterwards: each holds the instruction its site
    now has, so a trap taken during the batch but handled later is still right.
    (Skipped sites get their stale entries, if any, put right:
    :func:`_settle_skipped`.)

    ``on_step(step)`` is called after verification, after publishing and after
    each sync, so a test can hold the batch there. An exception it raises
    abandons the batch where it is, exactly as if the tool were killed there.

    Failures: a read-back mismatch raises PatchError naming the site (someone
    else writes this code). Any failure in step 2 (write, read-back or sync) is
    rolled back before it propagates (:func:`_rollback_int3`), leaving the text
    as it was. A failure in step 3 or 4 propagates without rollback: the sites
    hold int3 followed by old, new or mixed tail bytes, or already the new
    instruction, and the trap handler emulates the table's new instruction at
    every one of them, so the target behaves as if the batch had completed.
    Applying its revert completes every site and leaves exactly ``old``.
    Applying the same batch again completes it too and leaves exactly ``new``;
    after a failure in step 4 some sites already hold ``new``, so pass
    ``resume=True`` for that (see step 0). After the tool was killed at any
    point, the batch or its revert applied with ``resume=True`` always
    finishes the job, leaving exactly ``new`` or exactly ``old``.
    """
    batch = tuple(patches)
    plan, foreign = _verify(batch, text=text, table=table, resume=resume, skip_foreign=skip_foreign)
    _notify(on_step, Step.VERIFIED)
    work = [item for item in plan if item.write]
    skipped = tuple(item.site for item in plan if not item.write)
    _settle_skipped([item for item in plan if not item.write], table=table)
    if not work:
        return BatchResult(patched=(), skipped=skipped, syncs=0, foreign=foreign)

    _publish(work, table=table)
    _notify(on_step, Step.PUBLISHED)
    _poke_int3(work, text=text, sync=sync, table=table)
    _notify(on_step, Step.INT3)
    _poke_tail(work, text=text, sync=sync)
    _notify(on_step, Step.TAIL)
    _poke_head(work, text=text, sync=sync)
    _notify(on_step, Step.HEAD)
    return BatchResult(patched=tuple(item.site for item in work), skipped=skipped, syncs=3, foreign=foreign)


def _notify(on_step: Callable[[Step], None] | None, step: Step) -> None:
    if on_step is not None:
        on_step(step)


def _verify(
    batch: Sequence[Patch], *, text: TextAccess, table: InFlightTable, resume: bool, skip_foreign: bool = False
) -> tuple[list[_Planned], tuple[int, ...]]:
    """Step 0: check the whole batch before anything is written.

    Returns the plan of each patch, in batch order, and the foreign sites
    (someone else's int3) left out with ``skip_foreign``. The bytes are read and
    compared here, and the writes of steps 2-4 assume them: this is the "read
    back and matched the expected old bytes" invariant of design.md.
    """
    for patch in batch:
        if not isinstance(patch, Patch):
            raise UsageError(f"apply_batch takes Patch values, not {type(patch).__name__}")
    ordered = sorted(batch, key=lambda p: p.site)
    for first, second in zip(ordered, ordered[1:]):
        # Overlapping patches would write one instruction's bytes into another;
        # a duplicate site (distance 0) would be published twice.
        if second.site - first.site < SITE_SIZE:
            raise SiteError(
                f"patches at {first.site:#x} and {second.site:#x} overlap",
                hint="give each site once; sites are 5 bytes long",
            )

    current = _read_sites(text, [p.site for p in batch])
    plan: list[_Planned] = []
    problems: list[str] = []
    foreign: list[int] = []
    for patch, now in zip(batch, current):
        if now[0] == INT3_BYTE:
            entry = table.lookup(patch.site)
            if entry is None:
                foreign.append(patch.site)
                continue
            # Left in flight by an interrupted batch: threads execute the
            # entry (the handler emulates it), so that is the site's instruction.
            if entry not in (patch.old, patch.new):
                problems.append(
                    f"{patch.site:#x} is in flight to {entry.hex(' ')}, "
                    f"expected {patch.old.hex(' ')}"
                )
                continue
            plan.append(_Planned(patch, now, entry, write=True))
        elif now == patch.old:
            plan.append(_Planned(patch, now, now, write=patch.changes))
        elif resume and now == patch.new:
            plan.append(_Planned(patch, now, now, write=False))
        else:
            problems.append(
                f"{patch.site:#x} holds {now.hex(' ')}, expected {patch.old.hex(' ')}"
            )
    if problems:
        shown = "; ".join(problems[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        also = f"; {_foreign_text(foreign, len(batch))}" if foreign else ""
        raise SiteMismatch(
            f"{len(problems)} of {len(batch)} sites do not hold the expected bytes, "
            f"nothing was written: {shown}{more}{also}"
        )
    if foreign and not skip_foreign:
        raise ForeignTrap(f"{_foreign_text(foreign, len(batch))}; nothing was written", sites=tuple(foreign))

    new_sites = sum(1 for item in plan if item.write and table.lookup(item.site) is None)
    if new_sites > table.headroom:
        raise PatchError(
            f"the in-flight table has room for {table.headroom} more sites, "
            f"this batch needs {new_sites}; nothing was written",
            hint="patch fewer distinct sites per session, or start the session "
            "with a larger table",
        )
    return plan, tuple(foreign)


def _foreign_text(foreign: Sequence[int], total: int) -> str:
    """How ForeignTrap and SiteMismatch name the sites that hold someone else's int3."""
    shown = ", ".join(f"{site:#x}" for site in foreign[:8])
    more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
    return (f"{len(foreign)} of {total} sites hold an int3 that is not textpoke's (a debugger's breakpoint "
            f"or a uprobe): {shown}{more}")


def _settle_skipped(skipped: Sequence[_Planned], *, table: InFlightTable) -> None:
    """Make the entries of skipped sites (if any) hold what those sites hold.

    An interrupted batch can leave an entry that disagrees with its site (it
    was published in step 1, then the batch died before the int3). No thread
    traps there because of us, but the handler would emulate that entry for
    any int3 with SI_KERNEL at the site, so the entry is put back to the
    site's real instruction: an existing entry only, one 8-byte store each.
    """
    for item in skipped:
        entry = table.lookup(item.site)
        if entry is not None and entry != item.effective:
            table.publish(item.site, item.effective)


def _publish(work: Sequence[_Planned], *, table: InFlightTable) -> None:
    """Step 1: publish each site's new instruction before any int3 is written.

    Pairs with ``handle_int3``'s lookup: a thread can trap on a site only after
    step 2 wrote its int3, and the table stores happen before the write in
    program order (and the write is a syscall), so the handler finds the entry.
    Verification checked the room, so no publish here can fail for fullness.
    """
    for item in work:
        table.publish(item.site, item.patch.new)


def _poke_int3(
    work: Sequence[_Planned], *, text: TextAccess, sync: Callable[[], None], table: InFlightTable
) -> None:
    """Step 2: int3 over every first byte, read back, sync.

    Pairs with step 1 (the entry exists before the int3) and with the sync of
    step 3: until that sync, a thread may still fetch the old tail, so the
    tail can only change once every thread traps here instead of executing it.
    Any failure here is rolled back, since no site has lost its old tail yet.
    """
    attempted: list[_Planned] = []
    try:
        write_many = getattr(text, "write_many", None)
        if write_many is not None:
            attempted = list(work)
            write_many([(item.site, INT3) for item in work])
        else:
            for item in work:
                attempted.append(item)
                text.write(item.site, INT3)
        _read_back(text, work, [INT3 + item.current[1:] for item in work], what="int3")
        sync()
    except BaseException as exc:  # also KeyboardInterrupt: undo before leaving
        _rollback_int3(work, attempted, text=text, sync=sync, table=table, error=exc)
        raise


def _rollback_int3(
    work: Sequence[_Planned],
    attempted: Sequence[_Planned],
    *,
    text: TextAccess,
    sync: Callable[[], None],
    table: InFlightTable,
    error: BaseException,
) -> None:
    """Undo step 2: restore the first bytes read in step 0, republish, sync.

    Pairs with :func:`_publish`: the entries go back to the instruction each
    site effectively holds again, so the table keeps holding what its site
    holds. A thread that trapped on one of our int3s and is handled only now
    emulates the new or the old instruction, both legitimate. Failures of the
    rollback itself are attached to ``error`` as notes, which then propagates.
    """
    for item in attempted:
        try:
            text.write(item.site, item.current[:1])
        except Exception as exc:  # keep restoring the others
            error.add_note(f"rollback: could not restore {item.site:#x}: {exc}")
    for item in work:
        table.publish(item.site, item.effective)
    try:
        sync()
    except Exception as exc:
        error.add_note(f"rollback: sync failed: {exc}")


def _poke_tail(work: Sequence[_Planned], *, text: TextAccess, sync: Callable[[], None]) -> None:
    """Step 3: new bytes 1..4 of every site, read back, sync.

    Safe because of step 2's sync: every thread now traps on the first byte
    and never fetches these bytes. Pairs with step 4, which may only expose
    the new first byte once this sync made the new tail visible to every thread.
    """
    _write_all(text, [(item.site + 1, item.patch.new[1:]) for item in work])
    _read_back(text, work, [INT3 + item.patch.new[1:] for item in work], what="tail")
    sync()


def _poke_head(work: Sequence[_Planned], *, text: TextAccess, sync: Callable[[], None]) -> None:
    """Step 4: new byte 0 of every site, read back, sync.

    Pairs with step 3's sync (the tail is already visible) and with the
    handler: after this sync no thread can newly trap on these int3s, while
    a trap taken earlier still finds the entry, which is never removed.
    """
    _write_all(text, [(item.site, item.patch.new[:1]) for item in work])
    _read_back(text, work, [item.patch.new for item in work], what="the first byte")
    sync()


def _write_all(text: TextAccess, writes: Sequence[tuple[int, bytes]]) -> None:
    write_many = getattr(text, "write_many", None)
    if write_many is not None:
        write_many(writes)
        return
    for addr, data in writes:
        text.write(addr, data)


def _read_back(
    text: TextAccess, work: Sequence[_Planned], expected: Sequence[bytes], *, what: str
) -> None:
    """Check each site holds ``expected`` after writing ``what``."""
    got = _read_sites(text, [item.site for item in work])
    bad = [(item.site, want, now) for item, want, now in zip(work, expected, got) if now != want]
    if bad:
        site, want, now = bad[0]
        others = f" ({len(bad) - 1} other sites too)" if len(bad) > 1 else ""
        raise PatchError(
            f"site {site:#x} reads back {now.hex(' ')} after writing {what}, "
            f"expected {want.hex(' ')}{others}",
            hint="another program (a debugger, another patcher) writes this code",
        )


def _read_sites(text: TextAccess, sites: Sequence[int]) -> list[bytes]:
    """The 5 bytes of each site, in the order given, with nearby sites read at once."""
    if not sites:
        return []
    order = sorted(range(len(sites)), key=sites.__getitem__)
    result: list[bytes] = [b""] * len(sites)
    run: list[int] = []  # indexes of sites covered by the current read

    def flush() -> None:
        start = sites[run[0]]
        length = sites[run[-1]] + SITE_SIZE - start
        data = text.read(start, length)
        if len(data) != length:
            raise PatchError(f"short read at {start:#x}: {len(data)} of {length} bytes")
        for index in run:
            offset = sites[index] - start
            result[index] = bytes(data[offset : offset + SITE_SIZE])

    for index in order:
        if run and sites[index] - (sites[run[-1]] + SITE_SIZE) > _READ_GAP:
            flush()
            run = []
        run.append(index)
    flush()
    return result


__all__ = [
    "BatchResult",
    "InFlightTable",
    "Patch",
    "Step",
    "TextAccess",
    "apply_batch",
    "revert_patches",
]
