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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .table import SiteTable


@dataclass(frozen=True)
class LedgerEntry:
    site: int
    original: bytes
    baseline: bytes


class Ledger:
    """Originals and baselines of every site textpoke touched in one target."""

    def __init__(self, buffer: Any, *, capacity: int) -> None:
        view = memoryview(buffer).cast("B")
        size = SiteTable.size_for(capacity)
        self.originals = SiteTable(view[:size], capacity=capacity)
        self.baselines = SiteTable(view[size : 2 * size], capacity=capacity)

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
