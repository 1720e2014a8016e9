"""A patching session on one live process: attach, apply batches, revert, detach.

The session owns the resident part's lock for its lifetime and remembers the
original bytes of every site it changed, so that leaving the ``with`` block
puts every byte back (one more batch: three syncs) before releasing the target.
It also records them in the target's ledger (poke/ledger.py) before changing
anything, so that if the tool dies instead, the next attach puts them back
(poke/recover.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType

import numpy as np

from .._errors import TargetStopped, UsageError
from ..target.inject import Urgent
from ..target.process import Process
from ..target.security import check_architecture
from ..target.spawn import spawn as target_spawn
from ..x86.insn import SITE_SIZE
from .bulk import PatchArray, apply_patches
from .protocol import BatchResult, Patch, Step
from .recover import Recovery, Restore, prepare
from .resident import DEFAULT_CAPACITY, Resident, ResidentStats
from .guard import BatchGuard
from .safety import MapsCache, attach_guard, check_addresses, ensure_handler, settle_traps


class Session:
    """Use :func:`attach`; a context manager that reverts and detaches on exit."""

    def __init__(self, process: Process, resident: Resident) -> None:
        self.process = process
        self.resident = resident
        # Every site this session changed (sorted), its bytes before our first patch,
        # and the bytes our last batch wrote there: columns, for batches of 100,000.
        self._sites = np.zeros(0, dtype=np.uint64)
        self._original = np.zeros((0, SITE_SIZE), dtype=np.uint8)
        self._current = np.zeros((0, SITE_SIZE), dtype=np.uint8)
        self.batches = 0
        #: What attach found left by earlier tools and put right (None: spawned).
        self.recovery: Recovery | None = None
        #: Times a batch found the program had replaced our SIGTRAP handler.
        self.handler_reinstalls = 0
        #: Threads held (they block SIGTRAP) over all batches, one per thread and batch;
        #: of them, those that started blocking SIGTRAP while a batch was under way.
        self.held_threads = 0
        self.late_held = 0
        #: Sites batches left out because they hold someone else's int3 (skip_foreign).
        self.foreign_sites: set[int] = set()
        self.last_guard: BatchGuard | None = None  # the last batch's guard (its timings)
        self.current_guard: BatchGuard | None = None  # the guard of the batch under way (for on_step)
        self._maps = MapsCache(process)
        self._closed = False
        self._failed = False  # a batch failed: the end of the session leaves recovery to the next attach

    @property
    def pid(self) -> int:
        return self.process.pid

    # -- reading --------------------------------------------------------------------
    def read_insn(self, site: int) -> bytes:
        return self.process.read(site, SITE_SIZE)

    def stats(self) -> ResidentStats:
        return self.resident.stats()

    @property
    def patched_sites(self) -> dict[int, bytes]:
        """Sites this session changed, with their original bytes."""
        changed = (self._current != self._original).any(axis=1)
        raw = self._original[changed].tobytes()
        return {site: raw[SITE_SIZE * i : SITE_SIZE * (i + 1)] for i, site in enumerate(self._sites[changed].tolist())}

    # -- patching -------------------------------------------------------------------
    def apply(self, patches: Iterable[Patch] | PatchArray, *, on_step: Callable[[Step], None] | None = None,
              skip_foreign: bool = False) -> BatchResult:
        """Apply one batch (three syncs whatever its size); see protocol.apply_batch
        (the specification) and bulk.apply_patches (how it is done, for the whole batch at once).

        ``patches``: Patch values or a :class:`~textpoke.poke.bulk.PatchArray`.
        ``skip_foreign``: sites holding someone else's int3 (a debugger's, a
        uprobe's) are left out instead of refusing the batch (ForeignTrap); the
        result's ``foreign`` names them, and so does :attr:`foreign_sites`."""
        batch = PatchArray.of(patches)
        if len(batch) and self.resident.clean:
            self.resident.mark_clean(False)  # before anything changes: a later attach recovers if we die
        self._preflight(batch)
        ledger = self.resident.ledger
        reached: list[Step] = []
        kept = [batch]

        def record(ours: PatchArray) -> None:
            # Verified, nothing published yet: the bytes each site returns to
            # (not for a site left out as foreign: it is not ours to return).
            kept[0] = ours
            ledger.record_many(ours.sites, ours.old)

        guard = BatchGuard(self.resident, batch.sites)

        def guarded(done: Step) -> None:
            guard.step(done)
            reached.append(done)
            if on_step is not None:
                on_step(done)

        self.current_guard = guard
        try:
            with guard:
                result = apply_patches(batch, text=self.process, sync=self.resident.sync, table=self.resident.table,
                                       on_step=guarded, skip_foreign=skip_foreign, on_verified=record,
                                       coalesce=self._maps.current().coalescable(batch.sites))
        except BaseException:
            # Past the int3 sync a failed batch is not rolled back: threads
            # execute the new instructions (emulated), so revert() must know.
            if Step.INT3 in reached:
                self._remember(kept[0])
            self._failed = True
            raise
        self._remember(kept[0])
        self.foreign_sites.update(result.foreign)
        self.batches += 1
        self.held_threads += guard.held_total
        self.late_held += guard.late
        self.last_guard = guard
        if result.syncs:
            settle_traps(self.process, exclude=frozenset({self.resident.agent_tid}))
        return result

    def _remember(self, batch: PatchArray) -> None:
        """Each site's bytes before our first patch (kept) and what we wrote last."""
        if not len(batch):
            return
        at = np.searchsorted(self._sites, batch.sites)
        known = at < len(self._sites)
        known[known] = self._sites[at[known]] == batch.sites[known]
        self._current[at[known]] = batch.new[known]
        if known.all():
            return
        sites = np.concatenate((self._sites, batch.sites[~known]))
        order = np.argsort(sites, kind="stable")
        self._sites = sites[order]
        self._original = np.concatenate((self._original, batch.old[~known]))[order]
        self._current = np.concatenate((self._current, batch.new[~known]))[order]

    def _preflight(self, batch: PatchArray) -> None:
        """Refuse a batch that could hurt the target, before anything is written
        (see poke/safety.py): sites outside the program's code or calls to
        non-code; and put our SIGTRAP handler back in front if the program
        installed its own since the last batch. (Threads that block SIGTRAP are
        held by the batch's guard, poke/guard.py.)"""
        if not len(batch):
            return  # nothing to write
        check_addresses(self.process, batch, maps=self._maps)
        if ensure_handler(self.resident):
            self.handler_reinstalls += 1

    def revert(self, *, on_step: Callable[[Step], None] | None = None) -> BatchResult:
        """Put back the original bytes of every site this session changed."""
        changed = (self._current != self._original).any(axis=1)
        batch = PatchArray(self._sites[changed], self._current[changed], self._original[changed])
        return self.apply(batch, on_step=on_step)

    # -- lifetime -------------------------------------------------------------------
    def commit(self) -> None:
        """Keep this session's changes: they become the sites' baselines, which
        a later attach leaves in place (``textpoke recover`` still undoes them)."""
        self.resident.ledger.commit_many(self._sites, self._current)

    def keep(self, sites: Iterable[int]) -> None:
        """Keep what this session wrote at ``sites`` after it ends: their current
        instructions become their baselines (as :meth:`commit` does for every site),
        and leaving the session does not revert them."""
        wanted = np.fromiter((int(site) for site in sites), dtype=np.uint64)
        mine = np.isin(self._sites, wanted)
        if not mine.any():
            return
        self.resident.ledger.commit_many(self._sites[mine], self._current[mine])
        self._sites, self._original, self._current = (self._sites[~mine], self._original[~mine],
                                                      self._current[~mine])

    def release(self) -> None:
        """Let a program started by ``spawn(..., hold=True)`` run (a no-op otherwise)."""
        held, self.resident.held = self.resident.held, None
        if held is not None:
            held.release()

    def close(self, *, revert: bool = True) -> None:
        """Revert (or, with ``revert=False``, :meth:`commit`) and release the
        target; the process runs on. A process that exited or exec'd has
        nothing of ours left to revert."""
        if self._closed:
            return
        self._closed = True
        self.release()
        try:
            if self.process.alive() and not self.process.replaced():
                failed = self._failed
                if revert:
                    self.revert()
                else:
                    self.commit()
                if not failed and not self._failed:
                    # Every site is at its baseline now: the next attach need not survey them.
                    self.resident.mark_clean(True)
        finally:
            self.resident.close()
            self.process.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def spawn(argv: Sequence[str], *, capacity: int = DEFAULT_CAPACITY, hold: bool = False,
          **popen: object) -> tuple[subprocess.Popen, Session]:
    """Start ``argv`` with the resident part installed before its ``main`` runs.

    Returns the process (a Popen: wait for it, read its pipes) and the session.
    The program runs as soon as this returns, or, with ``hold``, stays at its
    entry point until ``session.release()`` (or the session's end): patches
    applied meanwhile see every call the program makes."""
    proc = target_spawn(argv, **popen)
    try:
        process = Process(proc.pid)
        resident = Resident.attach(process, capacity=capacity, spawned=True)
        session = Session(process, resident)
        if not hold:
            session.release()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, session


def attach(pid: int, *, capacity: int = DEFAULT_CAPACITY, timeout_s: float = 10.0,
           restore: Restore | None = Restore.BASELINE, refuse_unsafe: bool = True) -> Session:
    """Attach to a running process: adopt or install its resident part.

    Stops one thread briefly the first time (see Resident._install); a later
    attach to the same process stops nothing. The steps:

    1. check the process, writing nothing: a live user-space x86-64 process
       we may trace (Process, check_architecture), not stopped (its agent could
       not run);
    2. under attach_guard (one tool at a time), adopt or install the resident
       part, taking the session lock (BusyError if another session holds it);
    3. recover.prepare: copy the state a fork child inherited, finish a cut-short
       install, put our SIGTRAP handler back if the program replaced it, and
       bring every site to ``restore`` (default: its baseline, undoing what a
       killed tool left; None: leave sites as they are). See ``session.recovery``.

    The tool runs SCHED_FIFO meanwhile when it may (target.inject.Urgent): on a
    loaded machine a fair-scheduled tool waited tens of milliseconds between its
    steps. ``timeout_s`` bounds every wait on the agent, including for a process that
    gets stopped (SIGSTOP) while we work (TargetStopped). ``refuse_unsafe`` is
    kept for callers of the time threads blocking SIGTRAP were refused; they
    are held during batches now (poke/guard.py), so it changes nothing."""
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise UsageError(f"pid must be an int, not {pid!r}")
    with Urgent():  # SCHED_FIFO while attaching, if allowed (target/inject.py): a few ms of work
        process = Process(pid)
        try:
            check_architecture(pid)
            if process.stopped():
                raise TargetStopped(f"process {pid} is stopped (SIGSTOP or a debugger); textpoke needs it running")
            with attach_guard(pid):
                resident = Resident.attach(process, capacity=capacity)
                try:
                    resident.timeout_s = timeout_s
                    recovery = prepare(resident, restore=restore)
                except BaseException:
                    resident.close()
                    raise
        except BaseException:
            process.close()
            raise
    session = Session(process, resident)
    session.recovery = recovery
    return session
