"""Emulating a site's instruction for a thread stopped on its ``int3``.

These are the three helpers of design.md section 1 (``emulate_jmp``,
``emulate_push``, ``emulate_call``), written once over an abstract register
frame and memory so that the pure specification (``poke/spec.py``), the ptrace
fallback and the tests all share one emulation code path.

Registers are immutable values: each helper returns a new :class:`RegisterFrame`
instead of editing one in place, because the x86-32 design *moves* the frame
(design.md section 1) and the caller must use the frame it gets back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from .._errors import UsageError
from .insn import CALL_SIZE, INT3

#: Word sizes of the two architectures: x86-64 (8) and i386 (4).
WORD_SIZES = (8, 4)


@dataclass(frozen=True)
class RegisterFrame:
    """The registers an emulation reads and writes: instruction and stack pointer.

    ``ip`` and ``sp`` are unsigned values of ``word_size`` bytes; every result
    is reduced modulo the word, as the CPU does (a push at ``sp == 0`` wraps).
    """

    ip: int
    sp: int
    word_size: int = 8

    def __post_init__(self) -> None:
        if self.word_size not in WORD_SIZES:
            raise UsageError(f"word_size must be 8 (x86-64) or 4 (i386), not {self.word_size}")
        limit = 1 << (8 * self.word_size)
        for name in ("ip", "sp"):
            value = getattr(self, name)
            # A negative or oversized register is a caller bug, not something to
            # wrap silently: only results of emulation wrap, inputs are exact.
            if not 0 <= value < limit:
                raise UsageError(
                    f"{name} {value:#x} does not fit a {self.word_size}-byte register"
                )

    @property
    def mask(self) -> int:
        """All-ones value of one word."""
        return (1 << (8 * self.word_size)) - 1


class Memory(Protocol):
    """The interrupted thread's memory as the emulation sees it."""

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


def emulate_jmp(regs: RegisterFrame, target: int) -> RegisterFrame:
    """``jmp target``: ``ip = target`` (reduced to the word, as a 32-bit rel32 wraps)."""
    return replace(regs, ip=target & regs.mask)


def emulate_push(regs: RegisterFrame, memory: Memory, value: int) -> RegisterFrame:
    """``push value``: ``sp -= word``, then store ``value`` little-endian at the new ``sp``.

    ``sp`` is decremented before the store, as the CPU does, so the value lands
    below the old top of stack and nothing live above it is touched.
    """
    sp = (regs.sp - regs.word_size) & regs.mask
    memory.write(sp, (value & regs.mask).to_bytes(regs.word_size, "little"))
    return replace(regs, sp=sp)


def emulate_call(regs: RegisterFrame, memory: Memory, target: int) -> RegisterFrame:
    """``call target`` for a thread trapped on the ``int3`` at the call's first byte.

    At trap time ``regs.ip`` is ``site + len(int3)``: the int3 has executed. The
    return address is the end of the 5-byte call, ``ip - len(int3) + CALL_SIZE``.
    """
    return_address = regs.ip - len(INT3) + CALL_SIZE
    return emulate_jmp(emulate_push(regs, memory, return_address), target)


__all__ = [
    "WORD_SIZES",
    "Memory",
    "RegisterFrame",
    "emulate_call",
    "emulate_jmp",
    "emulate_push",
]
