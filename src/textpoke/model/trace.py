"""Annotated traces of an interleaving: instruction, registers, stack words, notes.

A trace is recorded only when an interleaving is replayed for printing (reading
every register on every step costs more than the step); the scheduler replays
the first failing interleaving with a :class:`TraceRecorder` attached.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: Stack words shown per step.
STACK_WORDS = 4


@dataclass(frozen=True)
class TraceEvent:
    """One step of one actor, after it ran."""

    index: int
    actor: str
    cpu: int | None
    where: str
    text: str
    sp: int | None = None
    regs: tuple[tuple[str, int], ...] = ()
    stack: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass
class _Open:
    index: int
    actor: str
    cpu: int | None
    where: str
    text: str
    notes: list[str] = field(default_factory=list)


class TraceRecorder:
    """Collects the last ``keep`` events of a replay."""

    def __init__(self, keep: int = 4000) -> None:
        self.events: deque[TraceEvent] = deque(maxlen=keep)
        self.total = 0
        self._open: _Open | None = None

    def begin(self, *, actor: str, cpu: int | None, where: str, text: str) -> None:
        self._open = _Open(self.total, actor, cpu, where, text)
        self.total += 1

    def note(self, text: str) -> None:
        if self._open is not None:
            self._open.notes.append(text)

    def end(self, *, sp: int | None = None, regs: Sequence[tuple[str, int]] = (),
            stack: Sequence[int] = ()) -> None:
        o = self._open
        if o is None:
            return
        self.events.append(TraceEvent(o.index, o.actor, o.cpu, o.where, o.text, sp,
                                      tuple(regs), tuple(stack), tuple(o.notes)))
        self._open = None


def format_trace(events: Iterable[TraceEvent], *, cpu: int | None, limit: int, word: int) -> list[str]:
    """The last ``limit`` steps of CPU ``cpu`` and of the patcher, one line each.

    Registers and stack words are as they were *after* the step; notes say what
    the step meant (trap delivered, handler decision, patcher write, violation).
    """
    chosen = [e for e in events if cpu is None or e.cpu in (cpu, None)]
    dropped = max(0, len(chosen) - limit)
    chosen = chosen[dropped:]
    digits = word * 2
    lines: list[str] = []
    if dropped:
        lines.append(f"  ... {dropped} earlier steps not shown")
    header = f"  {'step':>6} {'actor':<7} {'location':<22} {'instruction':<34} {'sp':<{digits + 2}} regs / stack from sp up"
    lines.append(header)
    for e in chosen:
        sp = f"{e.sp:#0{digits + 2}x}" if e.sp is not None else ""
        regs = " ".join(f"{name}={value:#x}" for name, value in e.regs)
        stack = " ".join(f"{w:0{digits}x}" for w in e.stack)
        detail = regs + (f" | {stack}" if stack else "")
        lines.append(f"  {e.index:>6} {e.actor:<7} {e.where:<22} {e.text:<34} {sp:<{digits + 2}} {detail}".rstrip())
        for note in e.notes:
            lines.append(f"  {'':>6} {'':<7} -> {note}")
    return lines
