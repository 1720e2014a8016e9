"""Finding what an earlier textpoke left in a process, and putting it right.

A tool can die at any instant (``kill -9``), so every attach starts by looking
at what is there, before the new session writes anything:

- int3 bytes and half-written sites: a batch left in flight; the in-flight
  table knows each one's instruction (the handler emulates it meanwhile);
- sites a session changed but never put back (it died before closing): the
  ledger (poke/ledger.py) holds the baseline each one returns to;
- the resident part itself: adopted as it is (handler, agent, table,
  trampolines: never unmapped, a thread may still run in them); what an
  install cut short left undone is finished (membarrier registration, the
  SIGTRAP handler, the memfd descriptor left open in the target);
- after a fork: the child has its parent's mappings (shared with the parent!)
  but not its agent thread. It gets a resident part of its own, into which the
  inherited state is copied (:func:`adopt_inherited`); nothing is ever written
  to the inherited region, which the parent still uses.

Every site is then brought to its baseline (automatic on attach) or to its
original bytes (``textpoke recover``) in *one* batch, ``apply_batch(...,
resume=True)``, which completes in-flight sites whatever step they were left at.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
from dataclasses import dataclass

import numpy as np

from .._errors import InjectionError, SiteError
from ..target import syscalls as sc
from ..target.process import Process
from ..target.security import OUR_PREFIX
from ..x86.insn import INT3_BYTE, SITE_SIZE, decode_site, site_insns_ok
from .bulk import PatchArray, apply_patches, read_sites
from .fixes import reconcile_fixes
from .ledger import Ledger
from .protocol import Patch, TextAccess
from .resident import (
    CODE_SIZE,
    HANDLER_COPIES,
    HDR_FRONT,
    HDR_TABLE_CAPACITY,
    OLD_ACTIONS,
    TABLE_OFFSET,
    VERSION,
    RegionInfo,
    Resident,
    _region_path,
    ctl_size,
    find_regions,
    generate_code,
    handler_label,
    ledger_offset,
)
from .guard import BatchGuard
from .resident import AgentHeal
from .safety import MapsCache, _store_action, ensure_handler, settle_traps
from .table import SiteTable


class Restore(enum.Enum):
    """What recovery brings every site back to."""

    BASELINE = "baseline"  # undo sessions that died; keep committed changes (on attach)
    ORIGINAL = "original"  # the bytes before textpoke ever changed the site (textpoke recover)


@dataclass(frozen=True)
class SiteState:
    """One site as recovery finds it."""

    site: int
    current: bytes  # its bytes in memory now
    entry: bytes | None  # its in-flight table entry
    original: bytes | None  # from the ledger (None: not recorded)
    baseline: bytes | None

    @property
    def in_flight(self) -> bool:
        """A batch left an int3 here: threads execute the table's entry."""
        return self.current[0] == INT3_BYTE and self.entry is not None

    @property
    def effective(self) -> bytes:
        """The instruction threads execute here now."""
        return self.entry if self.in_flight and self.entry is not None else self.current

    def goal(self, restore: Restore) -> bytes:
        if self.original is None or self.baseline is None:
            return self.effective  # unknown to the ledger: just complete it
        return self.original if restore is Restore.ORIGINAL else self.baseline


@dataclass(frozen=True)
class Recovery:
    """What an attach or ``textpoke recover`` found and did."""

    restore: Restore
    sites: int  # sites known to the ledger or the table
    in_flight: tuple[int, ...]  # sites found with an int3 (a batch left half done)
    written: tuple[int, ...]  # sites rewritten (each: int3, tail, head)
    syncs: int
    #: Sites holding bytes that are neither theirs nor ours (someone else wrote
    #: there, a debugger's int3): left untouched.
    foreign: tuple[int, ...] = ()
    #: Sites left as they are (kept for readers of the time threads blocking
    #: SIGTRAP held recovery back; they are held during the batch now: always empty).
    held_back: tuple[int, ...] = ()
    #: Fork child: code address of the parent's region whose state was copied.
    inherited_from: int | None = None
    handler_reinstalled: bool = False
    fds_closed: int = 0
    #: Trampoline regions mapped (idle after recovery; never unmapped).
    trampoline_regions: int = 0
    #: Batches the resident agent finished itself because their tool died,
    #: since the previous attach looked (who died, how many sites).
    agent_heal: AgentHeal | None = None
    #: Threads held during the recovery batch (they block SIGTRAP).
    held_threads: int = 0

    @property
    def changed_anything(self) -> bool:
        return bool(self.written or self.handler_reinstalled or self.fds_closed or self.inherited_from)


@dataclass(frozen=True)
class Survey:
    """Every site the ledger or the table knows, with its bytes now, as columns
    (sites sorted; rows (N, 5) u8): what :func:`survey` gives as SiteState values."""

    sites: np.ndarray
    current: np.ndarray
    has_entry: np.ndarray
    entry: np.ndarray
    has_original: np.ndarray
    original: np.ndarray
    baseline: np.ndarray

    @property
    def in_flight(self) -> np.ndarray:
        """A batch left an int3 here: threads execute the table's entry."""
        return (self.current[:, 0] == INT3_BYTE) & self.has_entry

    @property
    def effective(self) -> np.ndarray:
        """The instruction threads execute at each site now."""
        return np.where(self.in_flight[:, None], self.entry, self.current)

    def goal(self, restore: Restore) -> np.ndarray:
        """What each site returns to (unknown to the ledger: its effective instruction)."""
        known = self.original if restore is Restore.ORIGINAL else self.baseline
        return np.where(self.has_original[:, None], known, self.effective)

    def states(self) -> list[SiteState]:
        rows = [np.ascontiguousarray(a).tobytes() for a in (self.current, self.entry, self.original, self.baseline)]

        def row(k: int, i: int) -> bytes:
            return rows[k][SITE_SIZE * i : SITE_SIZE * (i + 1)]

        entry, original = self.has_entry.tolist(), self.has_original.tolist()
        return [SiteState(site=site, current=row(0, i), entry=row(1, i) if entry[i] else None,
                          original=row(2, i) if original[i] else None, baseline=row(3, i) if original[i] else None)
                for i, site in enumerate(self.sites.tolist())]


def survey_arrays(process: TextAccess, table: SiteTable, ledger: Ledger) -> Survey:
    """Every site the ledger or the table knows, with its bytes now (one read per run of sites)."""
    recorded, originals, baselines = ledger.arrays()
    order = np.argsort(recorded)
    recorded, originals, baselines = recorded[order], originals[order], baselines[order]
    entries, _ = table.entry_arrays()
    both = np.sort(np.concatenate((recorded, entries)).astype(np.uint64))
    sites = both[np.concatenate(([True], both[1:] != both[:-1]))] if len(both) else both
    current = read_sites(process, sites)
    has_entry, entry = table.lookup_many(sites)
    at = np.searchsorted(recorded, sites)
    has_original = at < len(recorded)
    has_original[has_original] = recorded[at[has_original]] == sites[has_original]
    original = np.zeros((len(sites), SITE_SIZE), dtype=np.uint8)
    baseline = np.zeros((len(sites), SITE_SIZE), dtype=np.uint8)
    original[has_original] = originals[at[has_original]]
    baseline[has_original] = baselines[at[has_original]]
    return Survey(sites, current, has_entry, entry, has_original, original, baseline)


def survey(process: TextAccess, table: SiteTable, ledger: Ledger) -> list[SiteState]:
    """Every site the ledger or the table knows, with its bytes now."""
    return survey_arrays(process, table, ledger).states()


def plan_recovery(
    states: list[SiteState], restore: Restore, *, sigtrap_blocked: bool = False
) -> tuple[list[Patch], list[int], list[int]]:
    """The recovery batch for ``states`` (pure): (patches, foreign sites, held-back sites).

    One patch per site, effective instruction -> goal; a site whose bytes are
    no site instruction is foreign (left alone); with ``sigtrap_blocked`` a
    whole site is left as it is (no new int3), an in-flight one still finished."""
    patches: list[Patch] = []
    foreign: list[int] = []
    held_back: list[int] = []
    for state in states:
        goal = state.goal(restore)
        if sigtrap_blocked and not state.in_flight and goal != state.effective:
            held_back.append(state.site)
            goal = state.effective
        try:
            patches.append(Patch(site=state.site, old=state.effective, new=goal))
        except SiteError:
            foreign.append(state.site)
    return patches, foreign, held_back


def recover(resident: Resident, *, restore: Restore = Restore.BASELINE) -> Recovery:
    """Bring every known site of the target to ``restore``, in one batch.

    1. survey: the bytes of every site in the ledger or the table; under an
       int3 (a batch left in flight) the table's entry is what threads run;
    2. plan one patch per site, effective instruction -> goal; a site whose
       bytes are not a site instruction (someone else's) is left alone;
    3. ``apply_batch(..., resume=True)`` under a BatchGuard (threads that
       block SIGTRAP held while int3s are in place): completes in-flight
       sites, skips sites already at their goal (fixing stale table entries),
       3 syncs if anything is written, none otherwise;
    4. for ORIGINAL, the originals become the baselines too (every hot-fix
       record was set OUT before step 1: poke/fixes.py).
    """
    process = resident.process
    if restore is Restore.ORIGINAL:
        reconcile_fixes(resident, all_out=True)  # every hot-fix out: its sites go back to their originals
    found = survey_arrays(process, resident.table, resident.ledger)
    effective, goal = found.effective, found.goal(restore)
    # A site whose bytes are no site instruction (someone else wrote there) is left alone.
    valid = site_insns_ok(effective) & site_insns_ok(goal)
    batch = PatchArray(found.sites[valid], effective[valid], goal[valid])
    coalesce = MapsCache(process).current().coalescable(batch.sites) if len(batch) else True
    with BatchGuard(resident, batch.sites) as guard:
        result = apply_patches(batch, text=process, sync=resident.sync, table=resident.table, resume=True,
                               on_step=guard.step, coalesce=coalesce)
    if result.syncs:
        settle_traps(process, exclude=frozenset({resident.agent_tid}))
    if restore is Restore.ORIGINAL:
        back = found.has_original & valid
        resident.ledger.commit_many(found.sites[back], found.original[back])
    return Recovery(
        restore=restore,
        sites=len(found.sites),
        in_flight=tuple(found.sites[found.in_flight].tolist()),
        written=result.patched,
        syncs=result.syncs,
        foreign=tuple(found.sites[~valid].tolist()),
        held_back=(),
        trampoline_regions=_trampoline_regions(process),
        held_threads=guard.held_total,
    )


def _trampoline_regions(process: Process) -> int:
    return len({m.inode for m in process.maps() if m.path.startswith(OUR_PREFIX + "-")})


def close_leaked_fds(resident: Resident) -> int:
    """Close descriptors of our memfds left open in the target, but the one the
    resident region keeps (a later session opens the region through it).

    map_shared closes its descriptor right after mapping; a tool killed in
    between leaves one open (harmless, close-on-exec, but it is ours). Those of
    regions kept for reuse (map_shared(reuse=True)) stay. Only called under
    the session lock, so no live tool is between those two steps."""
    pid = resident.process.pid
    kept = resident.reusable_inodes()
    closed = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            inode = os.stat(f"/proc/{pid}/fd/{name}").st_ino
        except OSError:
            continue
        if link.startswith(OUR_PREFIX) and inode != resident.inode and inode not in kept:
            resident.syscall(sc.SYS_close, int(name))
            closed += 1
    return closed


def _read_region(process: Process, region: RegionInfo) -> bytes:
    """A snapshot of an inherited region's control area, read-only (never mapped
    writable: the parent still uses it): from its memfd (a hole reads as zeros there
    without being allocated; most of the table and ledger are holes), else through
    /proc/PID/mem."""
    ctl = region.base + CODE_SIZE
    (capacity,) = struct.unpack("<Q", process.read(ctl + HDR_TABLE_CAPACITY, 8))
    size = ctl_size(capacity)
    try:
        path = _region_path(process, base=region.base, end=region.base + CODE_SIZE, inode=region.inode,
                            fd=region.fd)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (InjectionError, OSError):
        return process.read(ctl, size)
    try:
        if os.fstat(fd).st_ino == region.inode:
            data = os.pread(fd, size, CODE_SIZE)
            if len(data) == size:
                return data
    finally:
        os.close(fd)
    return process.read(ctl, size)


def _snapshot(data: bytes) -> tuple[SiteTable, Ledger]:
    """Private copies of the table and ledger of a control area read by _read_region."""
    capacity = struct.unpack_from("<Q", data, HDR_TABLE_CAPACITY)[0]
    table_size = SiteTable.size_for(capacity)
    table = SiteTable(bytearray(data[TABLE_OFFSET : TABLE_OFFSET + table_size]), capacity=capacity)
    start = ledger_offset(capacity)
    ledger = Ledger(bytearray(data[start : start + Ledger.size_for(capacity)]), capacity=capacity)
    return table, ledger


def inspect(process: Process) -> tuple[RegionInfo | None, list[SiteState]]:
    """What textpoke left in ``process``, read without writing or locking anything:
    its resident region (the process's own, else an inherited one) and its sites."""
    regions = [r for r in find_regions(process) if r.version == VERSION]
    region = next((r for r in regions if r.owned), regions[0] if regions else None)
    if region is None:
        return None, []
    table, ledger = _snapshot(_read_region(process, region))
    return region, survey(process, table, ledger)


#: How long the switch of a fork child's chain waits for threads in our handler.
SWITCH_LIMIT_S = 2.0


def adopt_inherited(resident: Resident) -> int | None:
    """In a fork child: copy the state of the region inherited from the parent.

    The child shares its parent's region (MAP_SHARED), whose handler the
    child's SIGTRAP disposition still names when the child gets its own
    resident part, so the new part's saved disposition (what its handler
    chains to) is the inherited handler. Then:

    1. find the inherited region that saved disposition points into (else, on
       a first install, any inherited region: its ledger still says what the
       child's sites were);
    2. snapshot its table and ledger (read-only);
    3. for each site: record its original and baseline in our ledger, and
       publish what threads of the child execute there (the parent's entry
       under an int3 the child inherited, else the child's own bytes) in our
       table: from then on our handler emulates it;
    4. last, once every thread was seen out of our code (a lookup made before 3
       may be on its way to the chain), chain our handler to the inherited
       region's saved disposition (the program's own), so the inherited handler
       is no longer used; this marks the copy done (an attach killed before it
       starts over).

    Returns the inherited region's code address, or None if there was nothing
    to copy. Leaves the sites as they are: recovery then brings them to their
    baselines.
    """
    process = resident.process
    inherited = [r for r in find_regions(process) if not r.owned and r.base != resident.base and r.version == VERSION]
    if not inherited:
        return None
    slot = OLD_ACTIONS[struct.unpack_from("<I", resident.ctl, HDR_FRONT)[0]]
    chained = struct.unpack_from("<Q", resident.ctl, slot)[0]
    source = next((r for r in inherited if r.base <= chained < r.base + CODE_SIZE), None)
    if source is None:
        if not resident.created:
            return None  # copied by an earlier attach
        source = inherited[0]
    data = _read_region(process, source)
    table, ledger = _snapshot(data)
    states = survey(process, table, ledger)
    for state in states:
        effective = state.effective
        original = state.original if state.original is not None else effective
        baseline = state.baseline if state.baseline is not None else original
        if not resident.ledger.record(state.site, original, baseline=baseline):
            resident.ledger.commit(state.site, baseline)
        try:
            decode_site(state.site, effective)
        except SiteError:
            continue  # not a site instruction now: nothing the handler could emulate
        resident.table.publish(state.site, effective)
    if source.base <= chained < source.base + CODE_SIZE:
        # A thread that looked its trap up in our table before step 3 published it is on
        # its way to our chained disposition, which must still be the inherited handler
        # when it reads it (that one emulates through the parent's table; the program's
        # own, SIG_DFL, would kill the process: seen under load). So the chain changes
        # only once every thread was seen out of our code since the publish.
        if not resident.threads_left(resident.base, resident.base + CODE_SIZE, limit_s=SWITCH_LIMIT_S):
            raise InjectionError(f"a thread of process {process.pid} stayed in textpoke's trap handler for "
                                 f"{SWITCH_LIMIT_S:g} s; the fork child's copy is not finished",
                                 hint="attach again: the copy starts over")
        # What the inherited handler copy in effect chains to (the program's own).
        offsets = generate_code(capacity=table.capacity)[1]
        copy = next((k for k in range(HANDLER_COPIES) if source.base + offsets[handler_label(k)] == chained),
                    struct.unpack_from("<I", data, HDR_FRONT)[0])
        _store_action(resident.ctl, slot, struct.unpack_from("<4Q", data, OLD_ACTIONS[copy]))
    return source.base


def prepare(resident: Resident, *, restore: Restore | None = Restore.BASELINE) -> Recovery:
    """Everything an attach does before the session may write (see the module doc):

    1. a batch whose tool died: let the agent finish it (Resident.settle_watch:
       it may be doing so right now), or take it over if it cannot tell;
    2. fork child: copy the inherited state (:func:`adopt_inherited`);
    3. an adopted part: close leaked descriptors, register for membarrier
       SYNC_CORE and give the agent its short slice unless the header says this
       process image has them (an install cut short may not have);
    4. SIGTRAP reaches our handler (:func:`safety.ensure_handler`);
    4b. the baselines follow the hot-fix records (:func:`fixes.reconcile_fixes`);
    5. recover every site to ``restore`` (None: only survey); nothing to do
       when the last session ended cleanly (HDR_CLEAN) and no heal or fork is
       in between (but for ORIGINAL); then threads that waited at the gate for
       the dead tool's batch go on (end_watch).
    """
    heal = resident.settle_watch()
    inherited = adopt_inherited(resident)
    resident.reclaim_released()
    closed = 0
    if not resident.created:
        closed = close_leaked_fds(resident)
        resident.register_membarrier()
        resident.tune_agent()
    reinstalled = ensure_handler(resident)
    # Hot-fixes (poke/fixes.py): each fix's state word is its commit point; the
    # baselines follow it here, so the batch below leaves every fix whole or gone.
    if reconcile_fixes(resident):
        resident.mark_clean(False)
    if heal is None and inherited is None and resident.clean and restore is not Restore.ORIGINAL:
        # The last session ended cleanly (HDR_CLEAN): every known site holds its baseline.
        found = Recovery(restore=Restore.BASELINE, sites=len(resident.ledger), in_flight=(), written=(), syncs=0,
                         trampoline_regions=_trampoline_regions(resident.process))
    elif restore is None:
        states = survey_arrays(resident.process, resident.table, resident.ledger)
        found = Recovery(restore=Restore.BASELINE, sites=len(states.sites),
                         in_flight=tuple(states.sites[states.in_flight].tolist()), written=(), syncs=0,
                         trampoline_regions=_trampoline_regions(resident.process))
    else:
        found = recover(resident, restore=restore)
    resident.end_watch()
    return dataclasses.replace(found, inherited_from=inherited, handler_reinstalled=reinstalled, fds_closed=closed,
                               agent_heal=heal)


__all__ = [
    "Recovery",
    "Restore",
    "SiteState",
    "adopt_inherited",
    "close_leaked_fds",
    "inspect",
    "plan_recovery",
    "prepare",
    "recover",
    "survey",
    "survey_arrays",
    "Survey",
]
