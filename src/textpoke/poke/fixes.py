"""The fix ledger: groups of sites switched as one, in the target's memory.

A hot-fix (textpoke/hotfix) redirects several sites at once, and must be in
force everywhere or nowhere, even if the tool dies between any two stores. The
site ledger (poke/ledger.py) keeps one baseline per site, and committing N
baselines is N stores: a tool killed among them would leave some functions
fixed and others not after the next attach. So each fix is a *record* here,
with its sites, the bytes each holds without the fix (``old``) and with it
(``new``), and one state word, IN or OUT: that word is the commit point. Every
attach (recover.prepare) first makes the baselines agree with the records (IN:
``new``, OUT: ``old``, :meth:`FixLedger.reconcile`), then brings the sites to
their baselines as always; ``textpoke recover`` sets every record OUT first.

Where: a data-only memfd mapping of its own (``textpoke-fixes``), whose target
address is the resident header word ``HDR_FIXES`` (0: none yet). It is read and
written through /proc/PID/mem (Process.read/write), so a later tool, which has
no descriptor of it, reads what a dead one wrote. Layout (little-endian):

- header (64 bytes): magic ``TPKFIXES``, u32 version, u32 0, u64 ``used``
  (bytes of whole records after the header), u64 ``count``;
- records, each: u32 size (8-aligned, whole record), u32 state (0 OUT, 1 IN),
  u64 id, u32 sites, u32 meta length, u64 0; then per site 24 bytes: u64 site,
  8 bytes old, 8 bytes new (5 used each); then the meta bytes (opaque here: the
  hotfix stage stores its names and the loaded image there as JSON).

Crash order: a record is written whole past ``used``, then ``used`` and
``count`` grow (one write): a record either counts whole or not at all. Its
state word is written alone (one 4-byte pwrite). Records are never removed:
reverting a fix sets it OUT, applying it again sets the same record IN.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .._errors import PatchError
from ..target.process import Process
from ..x86.insn import SITE_SIZE
from .bulk import insn_rows
from .ledger import Ledger
from .resident import HDR_FIXES, PAGE, Resident

MAGIC = int.from_bytes(b"TPKFIXES", "little")
VERSION = 1
HEADER = 64
LEDGER_SIZE = 64 * PAGE  # 256 KiB of records (a memfd: pages are allocated as records land)
REGION_NAME = "textpoke-fixes"
_RECORD_HEAD = struct.Struct("<IIQIIQ")  # size, state, id, sites, meta length, 0
_SITE = struct.Struct("<Q8s8s")
OUT, IN = 0, 1


@dataclass(frozen=True)
class FixRecord:
    """One fix as the target's ledger holds it."""

    offset: int  # of the record in the ledger mapping
    id: int
    state: int  # IN or OUT
    sites: tuple[int, ...]
    old: tuple[bytes, ...]
    new: tuple[bytes, ...]
    meta: dict = field(default_factory=dict)

    @property
    def in_force(self) -> bool:
        return self.state == IN


class FixLedger:
    """The fix records of one target (its resident part's ``HDR_FIXES`` mapping)."""

    def __init__(self, process: Process, address: int) -> None:
        self.process = process
        self.address = address

    # -- finding and creating ---------------------------------------------------------
    @classmethod
    def find(cls, resident: Resident) -> FixLedger | None:
        """The target's fix ledger, or None if no fix was ever recorded."""
        address = struct.unpack_from("<Q", resident.ctl, HDR_FIXES)[0]
        if not address:
            return None
        ledger = cls(resident.process, address)
        magic, version = struct.unpack("<QI", resident.process.read(address, 12))
        if magic != MAGIC or version != VERSION:
            raise PatchError(f"the fix ledger at {address:#x} in process {resident.process.pid} is not one textpoke "
                             f"{VERSION} reads (magic {magic:#x}, version {version})")
        return ledger

    @classmethod
    def create(cls, resident: Resident) -> FixLedger:
        """Find or make the ledger: a new mapping is filled in (header) before
        HDR_FIXES names it, so a named ledger is always a valid one."""
        found = cls.find(resident)
        if found is not None:
            return found
        region = resident.map_shared(code_size=0, data_size=LEDGER_SIZE, name=REGION_NAME)
        ledger = cls(resident.process, region.data_address)
        resident.process.write(region.data_address, struct.pack("<QIIQQ", MAGIC, VERSION, 0, 0, 0))
        struct.pack_into("<Q", resident.ctl, HDR_FIXES, region.data_address)  # last: the ledger exists
        return ledger

    # -- reading ------------------------------------------------------------------------
    def _header(self) -> tuple[int, int]:
        used, count = struct.unpack("<QQ", self.process.read(self.address + 16, 16))
        return used, count

    def records(self) -> list[FixRecord]:
        used, count = self._header()
        if used > LEDGER_SIZE - HEADER:
            raise PatchError(f"the fix ledger of process {self.process.pid} is corrupt (used {used})")
        raw = self.process.read(self.address + HEADER, used) if used else b""
        return list(_parse(raw, count))

    # -- writing (under the session lock) --------------------------------------------------
    def append(self, *, sites: list[int], old: list[bytes], new: list[bytes], meta: dict) -> FixRecord:
        """A new record, state OUT: written whole, then counted (one write of the header)."""
        used, count = self._header()
        blob = json.dumps(meta, sort_keys=True).encode()
        body = b"".join(_SITE.pack(site, o, n) for site, o, n in zip(sites, old, new, strict=True))
        size = _align8(_RECORD_HEAD.size + len(body) + len(blob))
        if HEADER + used + size > LEDGER_SIZE:
            raise PatchError(f"the fix ledger of process {self.process.pid} is full ({count} fixes recorded)",
                             hint="textpoke recover, or restart the program")
        record = _RECORD_HEAD.pack(size, OUT, count + 1, len(sites), len(blob), 0) + body + blob
        offset = HEADER + used
        self.process.write(self.address + offset, record.ljust(size, b"\0"))
        self.process.write(self.address + 16, struct.pack("<QQ", used + size, count + 1))  # the record counts
        return FixRecord(offset, count + 1, OUT, tuple(sites), tuple(old), tuple(new), meta)

    def set_state(self, record: FixRecord, state: int) -> None:
        """The commit point of a fix: one 4-byte write."""
        self.process.write(self.address + record.offset + 4, struct.pack("<I", state))

    def set_all_out(self) -> int:
        """Every record OUT (``textpoke recover``: the sites go back to their originals)."""
        changed = 0
        for record in self.records():
            if record.in_force:
                self.set_state(record, OUT)
                changed += 1
        return changed

    def reconcile(self, ledger: Ledger) -> int:
        """Make the site ledger's baselines agree with the records: IN -> ``new``,
        OUT -> ``old`` (only for sites the site ledger knows: a record whose batch
        never ran changed nothing). Returns how many baselines changed."""
        want: dict[int, bytes] = {}
        records = self.records()
        for record in records:  # OUT first, IN last: an IN record wins a site
            if not record.in_force:
                want.update(zip(record.sites, record.old))
        for record in records:
            if record.in_force:
                want.update(zip(record.sites, record.new))
        if not want:
            return 0
        sites = np.fromiter(want, dtype=np.uint64, count=len(want))
        insns = insn_rows(want.values())
        known, _ = ledger.originals.lookup_many(sites)
        found, current = ledger.baselines.lookup_many(sites)
        # Only sites the site ledger knows: an IN record's sites all are (its batch recorded
        # them before the record became IN); recording one here would make ``new`` its original.
        differs = known & (~found | (current != insns).any(axis=1))
        if differs.any():
            ledger.commit_many(sites[differs], insns[differs])
        return int(differs.sum())


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _parse(raw: bytes, count: int) -> Iterator[FixRecord]:
    at = 0
    for _ in range(count):
        size, state, ident, nsites, nmeta, _zero = _RECORD_HEAD.unpack_from(raw, at)
        if size < _RECORD_HEAD.size or at + size > len(raw):
            raise PatchError("the fix ledger is corrupt (a record overruns it)")
        sites, old, new = [], [], []
        pos = at + _RECORD_HEAD.size
        for _k in range(nsites):
            site, o, n = _SITE.unpack_from(raw, pos)
            sites.append(site)
            old.append(o[:SITE_SIZE])
            new.append(n[:SITE_SIZE])
            pos += _SITE.size
        meta = json.loads(raw[pos : pos + nmeta]) if nmeta else {}
        yield FixRecord(HEADER + at, ident, state, tuple(sites), tuple(old), tuple(new), meta)
        at += size


def fix_entry_sites(process: Process) -> dict[int, tuple[int, str]]:
    """Read-only, without attaching: each fixed function's start (where a redirected
    site jumps) -> (its fentry site in the fix's code, the fix's name), for the fixes
    in force whose code has fentry sites (hotfix/loader.py makes them)."""
    from .resident import CODE_SIZE, find_regions

    found: dict[int, tuple[int, str]] = {}
    for region in find_regions(process):
        if not region.owned:
            continue
        address = struct.unpack("<Q", process.read(region.base + CODE_SIZE + HDR_FIXES, 8))[0]
        if not address:
            continue
        for record in FixLedger(process, address).records():
            if not record.in_force:
                continue
            sites = sorted(record.meta.get("fentry_sites", ()))
            for start in record.meta.get("fix_functions", {}).values():
                # The fentry call is the first instruction, or follows an endbr64.
                site = next((s for s in sites if start <= s <= start + 4), None)
                if site is not None:
                    found[start] = (site, str(record.meta.get("name", "")))
    return found


def reconcile_fixes(resident: Resident, *, all_out: bool = False) -> int:
    """recover.prepare's step: the site baselines made to agree with the fix records
    (after ``all_out``: every fix OUT, for ``textpoke recover``). Returns the baselines changed."""
    fixes = FixLedger.find(resident)
    if fixes is None:
        return 0
    if all_out:
        fixes.set_all_out()
    return fixes.reconcile(resident.ledger)


__all__ = ["IN", "OUT", "FixLedger", "FixRecord", "fix_entry_sites", "reconcile_fixes"]
