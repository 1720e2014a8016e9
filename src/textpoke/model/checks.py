"""What the model checks, and the counters it keeps per site.

The checks themselves run inside the scheduler's step functions (they need the
CPU at the right instant); this module names the violations, classifies site
fetches and accumulates the per-site numbers the report prints.

Checked after every step (see :mod:`textpoke.model.scheduler` for where):

- every call through a site reaches exactly one of the site's old or new targets
  (``LOST_CALL`` / ``WRONG_TARGET``), and a callback site's call leaves exactly one
  record with the right function and parent (``DOUBLED_CALL`` / ``WRONG_RECORD``);
- every ``ret`` pops the address its call pushed, at the depth it pushed it
  (``WRONG_RETURN`` / ``STACK_IMBALANCE``); a call through a site returns to
  site + 5 at the depth it started from;
- the frame ``iret`` pops is the frame the CPU pushed, with only ip/sp changed as
  the handler decided, and the registers come back as they were
  (``CORRUPT_FRAME`` / ``CORRUPT_REGS``);
- while a CPU is in the int3 path, the live words of its interrupted stack
  (from the interrupted sp up) never change (``LIVE_STACK_OVERWRITTEN``);
- a CPU only executes a site's whole old or new instruction or traps on its int3
  (``TORN_INSN``), and what it executes is what memory holds (``STALE_CODE``: a
  translation cache that was not flushed);
- a kernel-mode int3 on a site in flight is handled (``UNHANDLED_INT3``), on
  x86-64 without moving the frame (``FRAME_MOVED``, do_int3's WARN), and no CPU
  faults (``CPU_FAULT``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..x86.insn import INT3_BYTE
from .patcher import SitePhase, Transition


class ViolationKind(enum.Enum):
    """Kinds of violation, each one check."""

    LOST_CALL = "lost call"
    WRONG_TARGET = "wrong target"
    DOUBLED_CALL = "doubled call"
    WRONG_RECORD = "wrong record"
    WRONG_RETURN = "wrong return address"
    STACK_IMBALANCE = "stack imbalance"
    CORRUPT_FRAME = "corrupted trap frame"
    CORRUPT_REGS = "corrupted registers"
    LIVE_STACK_OVERWRITTEN = "live stack word overwritten"
    TORN_INSN = "torn instruction"
    STALE_CODE = "stale code"
    UNHANDLED_INT3 = "unhandled int3"
    FRAME_MOVED = "frame moved (WARN)"
    CPU_FAULT = "cpu fault"


@dataclass(frozen=True)
class Violation:
    """The first thing that went wrong in one interleaving."""

    kind: ViolationKind
    cpu: int | None
    #: Index of the failing step in the interleaving (CPU and patcher steps, from 0).
    step: int
    pc: int
    message: str


class ModelViolation(Exception):
    """Raised by a check; ends the interleaving."""

    def __init__(self, kind: ViolationKind, message: str) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message


class Fetch(enum.Enum):
    """What a CPU found at a site it fetched."""

    OLD = "old"
    NEW = "new"
    INT3 = "int3"
    TORN = "torn"


def classify_fetch(data: bytes, transition: Transition) -> Fetch:
    """Old instruction, new one, int3 in front of either tail, or a torn mix."""
    if data == transition.new:  # first: with no patch in flight, old == new is "current"
        return Fetch.NEW
    if data == transition.old:
        return Fetch.OLD
    if data[0] == INT3_BYTE and data[1:] in (transition.old[1:], transition.new[1:]):
        return Fetch.INT3
    return Fetch.TORN


@dataclass(frozen=True)
class PhaseCounts:
    """Fetches of one site during one patch phase, and what the CPU did with them."""

    fetches: int = 0
    traps: int = 0
    executed_old: int = 0
    executed_new: int = 0

    def __add__(self, other: PhaseCounts) -> PhaseCounts:
        return PhaseCounts(
            self.fetches + other.fetches,
            self.traps + other.traps,
            self.executed_old + other.executed_old,
            self.executed_new + other.executed_new,
        )


@dataclass(frozen=True)
class SiteStats:
    """Per-site totals: calls through it and where they went, per-phase fetches.

    ``old_hits`` counts calls that reached the old target of a patch in flight;
    ``new_hits`` those that reached its new target -- or, with no patch in flight,
    the site's current target (old and new are then the same instruction).
    """

    name: str
    calls: int = 0
    old_hits: int = 0
    new_hits: int = 0
    completed: int = 0
    #: Completed calls whose target was a callback (each left one record).
    callbacks: int = 0
    phases: Mapping[SitePhase, PhaseCounts] = field(default_factory=dict)

    def phase(self, phase: SitePhase) -> PhaseCounts:
        return self.phases.get(phase, PhaseCounts())

    @property
    def traps(self) -> int:
        return sum(c.traps for c in self.phases.values())

    def __add__(self, other: SiteStats) -> SiteStats:
        phases = {p: self.phase(p) + other.phase(p) for p in SitePhase}
        return SiteStats(
            self.name,
            self.calls + other.calls,
            self.old_hits + other.old_hits,
            self.new_hits + other.new_hits,
            self.completed + other.completed,
            self.callbacks + other.callbacks,
            {p: c for p, c in phases.items() if c != PhaseCounts()},
        )


class SiteCounters:
    """Mutable accumulator behind :class:`SiteStats` (one per site per interleaving)."""

    __slots__ = ("name", "calls", "old_hits", "new_hits", "completed", "callbacks", "phases")

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.old_hits = 0
        self.new_hits = 0
        self.completed = 0
        self.callbacks = 0
        # phase -> [fetches, traps, executed_old, executed_new]
        self.phases: dict[SitePhase, list[int]] = {p: [0, 0, 0, 0] for p in SitePhase}

    def freeze(self) -> SiteStats:
        return SiteStats(
            self.name,
            self.calls,
            self.old_hits,
            self.new_hits,
            self.completed,
            self.callbacks,
            {p: PhaseCounts(*c) for p, c in self.phases.items() if any(c)},
        )


def sum_stats(names: Iterable[str], runs: Iterable[Mapping[str, SiteStats]]) -> tuple[SiteStats, ...]:
    """Add per-site stats over interleavings, in ``names`` order."""
    names = tuple(names)
    totals = {name: SiteStats(name) for name in names}
    for run in runs:
        for name in names:
            if name in run:
                totals[name] = totals[name] + run[name]
    return tuple(totals[name] for name in names)
