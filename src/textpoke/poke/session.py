"""A patching session on one live process: attach, apply batches, revert, detach.

The session owns the resident part's lock for its lifetime and remembers the
original bytes of every site it changed, so that leaving the ``with`` block
puts every byte back (one more batch: three syncs) before releasing the target.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType

from .._errors import UsageError
from ..target.process import Process
from ..target.spawn import spawn as target_spawn
from ..x86.insn import SITE_SIZE
from .protocol import BatchResult, Patch, Step, apply_batch
from .resident import DEFAULT_CAPACITY, Resident, ResidentStats


class Session:
    """Use :func:`attach`; a context manager that reverts and detaches on exit."""

    def __init__(self, process: Process, resident: Resident) -> None:
        self.process = process
        self.resident = resident
        self._original: dict[int, bytes] = {}  # site -> bytes before our first patch
        self._current: dict[int, bytes] = {}  # site -> bytes our last batch wrote
        self.batches = 0

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
    def apply(self, patches: Iterable[Patch], *, on_step: Callable[[Step], None] | None = None) -> BatchResult:
        """Apply one batch (three syncs whatever its size); see protocol.apply_batch."""
        batch = list(patches)
        result = apply_batch(batch, text=self.process, sync=self.resident.sync,
                             table=self.resident.table, on_step=on_step)
        for patch in batch:
            self._original.setdefault(patch.site, patch.old)
            self._current[patch.site] = patch.new
        self.batches += 1
        return result

    def revert(self, *, on_step: Callable[[Step], None] | None = None) -> BatchResult:
        """Put back the original bytes of every site this session changed."""
        batch = [Patch(site=site, old=self._current[site], new=old)
                 for site, old in sorted(self._original.items()) if self._current[site] != old]
        return self.apply(batch, on_step=on_step)

    # -- lifetime -------------------------------------------------------------------
    def close(self, *, revert: bool = True) -> None:
        """Revert (unless told not to) and release the target; the process runs on."""
        try:
            if revert and self.process.alive():
                self.revert()
        finally:
            self.resident.close()
            self.process.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def spawn(argv: Sequence[str], *, capacity: int = DEFAULT_CAPACITY, **popen: object) -> tuple[subprocess.Popen, Session]:
    """Start ``argv`` with the resident part installed before its ``main`` runs.

    Returns the process (a Popen: wait for it, read its pipes) and the session;
    the program runs as soon as this returns."""
    proc = target_spawn(argv, **popen)
    try:
        process = Process(proc.pid)
        resident = Resident.attach(process, capacity=capacity, spawned=True)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, Session(process, resident)


def attach(pid: int, *, capacity: int = DEFAULT_CAPACITY) -> Session:
    """Attach to a running process: adopt or install its resident part.

    Stops one thread briefly the first time (see Resident._install); a later
    attach to the same process stops nothing."""
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise UsageError(f"pid must be an int, not {pid!r}")
    process = Process(pid)
    try:
        resident = Resident.attach(process, capacity=capacity)
    except BaseException:
        process.close()
        raise
    return Session(process, resident)
