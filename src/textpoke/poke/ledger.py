"""The ledger: what every site held before textpoke, kept in the target's shared memory.

A session remembers the bytes it replaced in Python memory, and that memory
dies with the tool.  The ledger keeps them in the control region instead, so a
later attach (or ``textpoke recover``) can put every site back after the tool
was killed at any instant.  Two words per site, in two :class:`SiteTable` s
over consecutive areas of the control region, keyed like the in-flight table
(same hash, same probing, same load limit, so they hold the same key set):

- ``originals``: the site's bytes before textpoke ever changed it; written
  once, never changed (``textpoke recover`` reverts to these);
- ``baselines``: what the site holds when no session is attached: the
  original, or what a session *committed* (``textpoke patch`` leaves its change
  in place).  A session changes sites away from their baseline and puts them
  back when it closes; a session that died without closing is undone by the
  next attach, which reverts every site to its baseline.

Crash safety (the tool may die between any two stores): a site is recorded
*before* the batch that first changes it publishes anything (protocol step 0,
:data:`Step.VERIFIED`), baseline first, original last; ``originals`` is the
index, so a site that has an original has a baseline.  The resident handler
never reads the ledger; only the tool holding the session lock writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .table import SiteTable


@dataclass(frozen=True)
class LedgerEntry:
    site: int
    original: bytes
    baseline: bytes


class Ledger:
    """Originals and baselines of every site textpoke touched in one target."""

    def __init__(self, buffer: Any, *, capacity: int,
                 populated: Callable[[int, int], Sequence[tuple[int, int]]] | None = None) -> None:
        """``populated``: as SiteTable's, over the ledger's buffer (both tables)."""
        view = memoryview(buffer).cast("B")
        size = SiteTable.size_for(capacity)

        def part(offset: int) -> Callable[[int, int], Sequence[tuple[int, int]]] | None:
            if populated is None:
                return None
            return lambda start, end: [(lo - offset, hi - offset)
                                       for lo, hi in populated(start + offset, end + offset)]

        self.originals = SiteTable(view[:size], capacity=capacity, populated=part(0))
        self.baselines = SiteTable(view[size : 2 * size], capacity=capacity, populated=part(size))

    @staticmethod
    def size_for(capacity: int) -> int:
        return 2 * SiteTable.size_for(capacity)

    @property
    def headroom(self) -> int:
        return min(self.originals.headroom, self.baselines.headroom)

    def record(self, site: int, insn: bytes, *, baseline: bytes | None = None) -> bool:
        """Remember ``insn`` as the original (and baseline, unless given) of a
        site seen for the first time, before anything is written there; False
        if the site is known already (its original never changes)."""
        if self.originals.lookup(site) is not None:
            return False
        self.baselines.publish(site, insn if baseline is None else baseline)
        self.originals.publish(site, insn)  # last: the entry now counts
        return True

    def record_many(self, sites: np.ndarray, insns: np.ndarray, *, baselines: np.ndarray | None = None
                    ) -> np.ndarray:
        """:meth:`record` of every site of a u64 array (distinct), (N, 5) u8 each:
        every new site's baseline is stored before any new site's original (the
        crash order, for the whole batch). Returns which sites were new."""
        sites = np.asarray(sites, dtype=np.uint64)
        known, _ = self.originals.lookup_many(sites)
        new = ~known
        if new.any():
            base = insns if baselines is None else baselines
            self.baselines.publish_many(sites[new], np.asarray(base)[new])
            self.originals.publish_many(sites[new], np.asarray(insns)[new])  # last: the entries now count
        return new

    def commit_many(self, sites: np.ndarray, insns: np.ndarray) -> None:
        """:meth:`commit` of every site of a u64 array (distinct)."""
        sites = np.asarray(sites, dtype=np.uint64)
        insns = np.asarray(insns, dtype=np.uint8)
        new = self.record_many(sites, insns)
        if (~new).any():
            self.baselines.publish_many(sites[~new], insns[~new])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every recorded site as arrays: (sites u64, originals (N, 5) u8, baselines (N, 5) u8)."""
        sites, originals = self.originals.entry_arrays()
        found, baselines = self.baselines.lookup_many(sites)
        # A baseline is stored before its original; the fallback only guards a corrupted region.
        baselines[~found] = originals[~found]
        return sites, originals, baselines

    def commit(self, site: int, insn: bytes) -> None:
        """Make ``insn`` the baseline: what the site keeps after the session."""
        if self.originals.lookup(site) is None:
            self.record(site, insn)
            return
        self.baselines.publish(site, insn)

    def original(self, site: int) -> bytes | None:
        return self.originals.lookup(site)

    def baseline(self, site: int) -> bytes | None:
        if self.originals.lookup(site) is None:
            return None
        return self.baselines.lookup(site)

    def entries(self) -> Iterator[LedgerEntry]:
        for site, original in self.originals.entries():
            baseline = self.baselines.lookup(site)
            # A baseline is stored before its original, so it is there; the
            # fallback only guards a corrupted region.
            yield LedgerEntry(site, original, baseline if baseline is not None else original)

    def __len__(self) -> int:
        return len(self.originals)

    def __contains__(self, site: object) -> bool:
        return site in self.originals


__all__ = ["Ledger", "LedgerEntry"]
