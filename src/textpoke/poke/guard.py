"""What protects a target while one batch has int3s in place.

An int3 of ours is harmless to a thread that lets SIGTRAP through (the
resident handler emulates the site) and fatal to one that blocks it (the
kernel unblocks it, resets the disposition to SIG_DFL and the process dies).
And the int3s must not outlive the tool. For the milliseconds between the
batch's first int3 (protocol Step.PUBLISHED, nothing written yet) and its
last sync (Step.HEAD), :class:`BatchGuard`:

1. arms the watch (Resident.arm): should the tool die, the agent finishes
   the batch itself within milliseconds (resident._emit_heal);
2. holds exactly the threads that block SIGTRAP (target/hold.py), each
   checked not to stand inside a site of the batch, and points each at the
   resident gate, so that the tool's death (which makes the kernel release
   them) leaves them waiting there until the agent has finished the batch;
   a thread blocked in a syscall that a stop would end with a visible EINTR
   is waited for (``patience_s``), then the batch is refused, nothing written;
3. looks again after the int3 sync and after the tail sync, and holds a
   thread that started blocking SIGTRAP meanwhile (the window this leaves
   is a thread that starts blocking and runs into an in-flight site before
   the next look: see DEVELOPERS.md for its measured size);
4. at the end gives every held thread back exactly (registers, mask, any
   signal caught on its way) and disarms the watch. If the batch failed with
   int3s still in place, it first finishes them (the recovery rule: the
   table's entry); if even that fails, the held threads are left at the gate
   and the watch armed: the agent finishes the batch when this tool exits,
   or a later batch does, and only then do they go on.

Every other thread runs free all along.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType

import numpy as np

from .._errors import TextpokeError, UnsafeTarget
from ..target.hold import HeldThread, interruptible_quietly
from ..x86.insn import INT3_BYTE, SITE_SIZE
from .bulk import PatchArray, apply_patches, read_sites
from .protocol import Step
from .resident import CODE_SIZE, Resident, our_threads
from .safety import _SIGTRAP_BIT, _blocks_sigtrap, _thread_name


class BatchGuard:
    """Around one apply_batch: pass :meth:`step` as (part of) its ``on_step``; a context manager."""

    def __init__(self, resident: Resident, sites: Sequence[int] | np.ndarray, *, patience_s: float = 1.0) -> None:
        self.resident = resident
        self.process = resident.process
        self.sites = np.sort(np.asarray(sites, dtype=np.uint64))
        self.patience_s = patience_s
        self.held: dict[int, HeldThread] = {}
        self._ignored: frozenset[int] | None = None
        self.began = False
        self.written = False  # int3s may be in place
        #: Threads held, and of them those that started blocking SIGTRAP during the batch.
        self.held_total = 0
        self.late = 0
        #: Seconds from the first hold to the release (what the held threads lost),
        #: and from arming (before the first int3) to the end (after the last sync):
        #: how long int3s may have been in place.
        self.held_s = 0.0
        self.armed_s = 0.0
        self._held_at = 0.0
        self._armed_at = 0.0
        #: Seconds between consecutive looks for threads that start blocking SIGTRAP
        #: (the window a late blocker has to run into an in-flight site: the longest).
        self.look_gap_s = 0.0
        self._looked_at = 0.0

    # -- the steps -------------------------------------------------------------------
    def step(self, done: Step) -> None:
        if done is Step.PUBLISHED:
            self._begin()
        elif done in (Step.INT3, Step.TAIL):
            self._look_again()
        elif done is Step.HEAD:
            self._end(failed=False)

    def _blockers(self) -> list[int]:
        if self._ignored is None:  # our agent and install threads (named once, at birth), and a
            # spawned program's first thread, which we hold stopped already (Resident.held)
            held = self.resident.held
            self._ignored = (frozenset({self.resident.agent_tid}) | our_threads(self.process)
                             | (frozenset({held.tid}) if held is not None else frozenset()))
        ignored = self._ignored
        pid = self.process.pid
        return [tid for tid in self.process.threads()
                if tid not in ignored and tid not in self.held and _blocks_sigtrap(pid, tid)]

    def _begin(self) -> None:
        """Before the first int3: arm, then hold every thread that blocks SIGTRAP."""
        self.began = True
        self._armed_at = time.monotonic()
        resident = self.resident
        if resident.open_watch():
            resident.arm()
        self.written = True  # from here on, int3s may be written
        deadline = time.monotonic() + self.patience_s
        blockers = self._blockers()
        self._looked_at = time.monotonic()
        # Each thread is looked at once (one in our handler, let go, may be back
        # there at once while a dead tool's int3 is in place); only a thread in a
        # loud syscall is waited for.
        loud = [tid for tid in blockers if not interruptible_quietly(self.process, tid)]
        self._hold_all([tid for tid in blockers if tid not in loud], check=True)
        pid = self.process.pid
        while loud:
            loud = [tid for tid in loud if _blocks_sigtrap(pid, tid)]
            quiet = [tid for tid in loud if interruptible_quietly(self.process, tid)]
            self._hold_all(quiet, check=True)
            loud = [tid for tid in loud if tid not in quiet]
            if loud and time.monotonic() > deadline:
                self.written = False
                self._end(failed=True)
                tid = loud[0]
                nr = self.process.thread_syscall(tid)
                raise UnsafeTarget(
                    f"thread {tid} ({_thread_name(pid, tid) or '?'}) of process {pid} "
                    f"blocks SIGTRAP and waits in syscall {nr}, which textpoke's hold would end with EINTR; "
                    "nothing was written",
                    hint="retry when that thread is busy or waits in another call",
                )
            if loud:
                time.sleep(0.001)

    def _hold_all(self, tids: Sequence[int], *, check: bool) -> int:
        """Hold those of ``tids`` that really block SIGTRAP (all stopped at once); how many."""
        threads = []
        try:
            for tid in tids:
                thread = HeldThread(self.process, tid)
                threads.append(thread)
                thread.start()
            kept = 0
            for thread in threads:
                thread.finish()
                kept += self._keep(thread, check=check)
            return kept
        except BaseException:
            for thread in threads:
                if thread.tid not in self.held:
                    thread.release()
            raise

    def _keep(self, thread: HeldThread, *, check: bool) -> bool:
        """Keep a stopped thread if it really blocks SIGTRAP, else let it go; whether kept."""
        if not thread.held:
            return False  # it exited
        code = self.resident.base
        if not thread.mask & _SIGTRAP_BIT or code <= thread.position.rip < code + CODE_SIZE:
            # Not blocking SIGTRAP any more (the mask of a stopped thread is what
            # counts; /proc was read a moment before), or in our handler (which
            # blocks it while it runs, and returns to the emulated site with the
            # program's mask): not a blocker. Let go at once: a held thread holds
            # up an exec in another thread, and a gated one with a SIGTRAP of ours
            # pending would take it at the gate.
            thread.release()
            return False
        if not self.held:
            self._held_at = time.monotonic()
        self.held[thread.tid] = thread
        self.held_total += 1
        if check:
            self._check_position(thread)
        try:
            thread.arm_gate(self.resident.labels["gate"])
        except TextpokeError:
            pass  # no room on its stack: held all the same, only not gated should the tool die
        return True

    def _check_position(self, thread: HeldThread) -> None:
        """A thread stopped inside a site (not at its start) would resume in the
        middle of the new instruction: impossible at instruction boundaries, refused.
        One byte past a site that holds an int3 is where a thread stops that trapped
        there (an earlier batch's site in flight): its SIGTRAP, delivered when it
        goes on, makes the handler emulate the site."""
        where = thread.position
        for rip in (where.rip, where.restart_rip):
            if rip is None or not 0 <= rip < 1 << 64:
                continue
            at = int(np.searchsorted(self.sites, np.uint64(rip), side="right")) - 1
            site = int(self.sites[at]) if at >= 0 else 0
            if at >= 0 and site < rip < site + SITE_SIZE:
                if rip == site + 1 and self.process.read(site, 1)[0] == INT3_BYTE:
                    continue
                self.written = False
                self._end(failed=True)
                raise UnsafeTarget(
                    f"thread {thread.tid} of process {self.process.pid} stands inside the site at "
                    f"{site:#x} (at {rip:#x}); nothing was written",
                    hint="the site is not an instruction boundary; list the sites again",
                )

    def _look_again(self) -> None:
        """Between syncs: hold threads that started blocking SIGTRAP since the last look.
        With int3s in place, one in a loud syscall is held too (an EINTR beats death)."""
        blockers = self._blockers()
        now = time.monotonic()
        self.look_gap_s = max(self.look_gap_s, now - self._looked_at)
        self._looked_at = now
        self.late += self._hold_all(blockers, check=False)

    # -- the end ---------------------------------------------------------------------
    def _finish(self) -> bool:
        """The batch failed with int3s in place: complete them (the recovery rule:
        a site under an int3 that the table knows becomes its entry)."""
        if not len(self.sites):
            return True
        table = self.resident.table
        try:
            trapped = read_sites(self.process, self.sites)[:, 0] == INT3_BYTE
        except TextpokeError:
            return True
        found, entry = table.lookup_many(self.sites)
        left = trapped & found
        if not left.any():
            return True
        try:
            apply_patches(PatchArray(self.sites[left], entry[left], entry[left]), text=self.process,
                          sync=self.resident.sync, table=table, resume=True, coalesce=False)
        except TextpokeError:
            return False
        return True

    def _end(self, *, failed: bool) -> None:
        if not self.began:
            return
        self.began = False
        end = time.monotonic()
        self.armed_s = end - self._armed_at
        if self._looked_at:
            self.look_gap_s = max(self.look_gap_s, end - self._looked_at)
        if failed and self.written and not self._finish():
            # Left at the gate, watch armed: they go on once the batch is finished
            # by the agent (this tool's exit) or a later batch of this session.
            for thread in self.held.values():
                thread.abandon() if thread.gated else thread.release()
            self._close_held()
            return
        errors: list[BaseException] = []
        for thread in self.held.values():
            try:
                thread.release()
            except TextpokeError as exc:
                errors.append(exc)
        self._close_held()
        self.resident.disarm()
        if errors:
            raise errors[0]

    def _close_held(self) -> None:
        if self.held:
            self.held_s = time.monotonic() - self._held_at
        self.held.clear()

    def __enter__(self) -> BatchGuard:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._end(failed=et is not None)


__all__ = ["BatchGuard"]
