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

from .._errors import TargetStopped, UsageError
from ..target.process import Process
from ..target.security import check_architecture
from ..target.spawn import spawn as target_spawn
from ..x86.insn import INT3_BYTE, SITE_SIZE
from .protocol import BatchResult, Patch, Step, _read_sites, apply_batch
from .recover import Recovery, Restore, prepare
from .resident import DEFAULT_CAPACITY, Resident, ResidentStats
from .guard import BatchGuard
from .safety import MapsCache, attach_guard, check_addresses, ensure_handler, settle_traps


class Session:
    """Use :func:`attach`; a context manager that reverts and detaches on exit."""

    def __init__(self, process: Process, resident: Resident) -> None:
        self.process = process
        self.resident = resident
        self._original: dict[int, bytes] = {}  # site -> bytes before our first patch
        self._current: dict[int, bytes] = {}  # site -> bytes our last batch wrote
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
        return {site: old for site, old in self._original.items() if self._current.get(site) != old}

    # -- patching -------------------------------------------------------------------
    def apply(self, patches: Iterable[Patch], *, on_step: Callable[[Step], None] | None = None,
              skip_foreign: bool = False) -> BatchResult:
        """Apply one batch (three syncs whatever its size); see protocol.apply_batch.

        ``skip_foreign``: sites holding someone else's int3 (a debugger's, a
        uprobe's) are left out instead of refusing the batch (ForeignTrap); the
        result's ``foreign`` names them, and so does :attr:`foreign_sites`."""
        batch = list(patches)
        self._preflight(batch)
        ledger = self.resident.ledger
        reached: list[Step] = []

        def step(done: Step) -> None:
            if done is Step.VERIFIED:
                # Verified, nothing published yet: the bytes each site returns to
                # (not for a site left out as foreign: it is not ours to return).
                table = self.resident.table
                current = _read_sites(self.process, [p.site for p in batch]) if skip_foreign else None
                for i, patch in enumerate(batch):
                    if current and current[i][0] == INT3_BYTE and patch.site not in table:
                        continue
                    ledger.record(patch.site, patch.old)
            reached.append(done)
            if on_step is not None:
                on_step(done)

        guard = BatchGuard(self.resident, [patch.site for patch in batch if isinstance(patch, Patch)])

        def guarded(done: Step) -> None:
            guard.step(done)
            step(done)

        self.current_guard = guard
        try:
            with guard:
                result = apply_batch(batch, text=self.process, sync=self.resident.sync,
                                     table=self.resident.table, on_step=guarded, skip_foreign=skip_foreign)
        except BaseException:
            # Past the int3 sync a failed batch is not rolled back: threads
            # execute the new instructions (emulated), so revert() must know.
            if Step.INT3 in reached:
                self._remember(batch)
            raise
        left_out = set(result.foreign)
        self._remember([patch for patch in batch if patch.site not in left_out])
        self.foreign_sites.update(left_out)
        self.batches += 1
        self.held_threads += guard.held_total
        self.late_held += guard.late
        self.last_guard = guard
        if result.syncs:
            settle_traps(self.process, exclude=frozenset({self.resident.agent_tid}))
        return result

    def _remember(self, batch: list[Patch]) -> None:
        for patch in batch:
            self._original.setdefault(patch.site, patch.old)
            self._current[patch.site] = patch.new

    def _preflight(self, batch: list[Patch]) -> None:
        """Refuse a batch that could hurt the target, before anything is written
        (see poke/safety.py): sites outside the program's code or calls to
        non-code; and put our SIGTRAP handler back in front if the program
        installed its own since the last batch. (Threads that block SIGTRAP are
        held by the batch's guard, poke/guard.py.)"""
        patches = [patch for patch in batch if isinstance(patch, Patch)]
        if not patches or len(patches) != len(batch):
            return  # nothing to write, or apply_batch refuses the batch itself
        check_addresses(self.process, patches, maps=self._maps)
        if ensure_handler(self.resident):
            self.handler_reinstalls += 1

    def revert(self, *, on_step: Callable[[Step], None] | None = None) -> BatchResult:
        """Put back the original bytes of every site this session changed."""
        batch = [Patch(site=site, old=self._current[site], new=old)
                 for site, old in sorted(self._original.items()) if self._current[site] != old]
        return self.apply(batch, on_step=on_step)

    # -- lifetime -------------------------------------------------------------------
    def commit(self) -> None:
        """Keep this session's changes: they become the sites' baselines, which
        a later attach leaves in place (``textpoke recover`` still undoes them)."""
        for site, insn in self._current.items():
            self.resident.ledger.commit(site, insn)

    def keep(self, sites: Iterable[int]) -> None:
        """Keep what this session wrote at ``sites`` after it ends: their current
        instructions become their baselines (as :meth:`commit` does for every site),
        and leaving the session does not revert them."""
        for site in sites:
            insn = self._current.pop(site, None)
            self._original.pop(site, None)
            if insn is not None:
                self.resident.ledger.commit(site, insn)

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
                if revert:
                    self.revert()
                else:
                    self.commit()
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

    ``timeout_s`` bounds every wait on the agent, including for a process that
    gets stopped (SIGSTOP) while we work (TargetStopped). ``refuse_unsafe`` is
    kept for callers of the time threads blocking SIGTRAP were refused; they
    are held during batches now (poke/guard.py), so it changes nothing."""
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise UsageError(f"pid must be an int, not {pid!r}")
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
