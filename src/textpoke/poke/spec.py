"""``handle_int3``: the pure specification of the trap handler.

Every implementation of the handler (the resident SIGTRAP handler generated as
machine code, the ptrace fallback, the model's kernel handler) must produce
exactly what this function produces for the same trap and table; their tests
compare against it. It has no side effects: instead of editing the interrupted
thread, it returns the registers and the memory words the emulation writes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, Protocol

from ..x86.emulate import RegisterFrame, emulate_call, emulate_jmp
from ..x86.insn import CALL_SIZE, INT3, InsnKind, decode_site

#: ``si_code`` of a SIGTRAP raised by an ``int3`` instruction (the kernel sends
#: SI_KERNEL for it; single-steps, hardware breakpoints and ``kill`` carry other
#: codes and are never ours).
SI_KERNEL = 0x80


class NotOurs(enum.Enum):
    """The trap is not at an in-flight site: chain to whoever handled it before."""

    NOT_OURS = "not ours"


NOT_OURS: Literal[NotOurs.NOT_OURS] = NotOurs.NOT_OURS


@dataclass(frozen=True)
class TrapFrame:
    """What the handler sees of the trapped thread.

    ``ip`` is the address *after* the int3 (the CPU has executed it), ``sp`` the
    interrupted stack pointer, ``si_code`` the signal's code.
    """

    ip: int
    sp: int
    si_code: int
    word_size: int = 8

    def __post_init__(self) -> None:
        # Same checks as the registers it becomes (word size, ranges).
        self.registers()

    def registers(self) -> RegisterFrame:
        return RegisterFrame(ip=self.ip, sp=self.sp, word_size=self.word_size)


@dataclass(frozen=True)
class Emulated:
    """The thread's state after emulation: resume at ``ip`` with ``sp``.

    ``stores`` are the words the emulation wrote, in order, as
    ``(address, value)``; each is one word of the frame's ``word_size``.
    """

    ip: int
    sp: int
    stores: tuple[tuple[int, int], ...] = ()


class SiteLookup(Protocol):
    """What the handler needs of the table: the instruction published for a site."""

    def lookup(self, addr: int) -> bytes | None: ...


class _RecordingMemory:
    """Memory that records the emulation's stores instead of performing them."""

    def __init__(self) -> None:
        self.stores: list[tuple[int, int]] = []

    def read(self, addr: int, n: int) -> bytes:
        # nop/jmp/call never load from the thread's memory; a read here means
        # the emulation changed and this specification must say what it reads.
        raise AssertionError(f"handle_int3 emulation read {n} bytes at {addr:#x}")

    def write(self, addr: int, data: bytes) -> None:
        self.stores.append((addr, int.from_bytes(data, "little")))


def handle_int3(frame: TrapFrame, table: SiteLookup) -> Emulated | NotOurs:
    """Handle a trap at ``frame`` given the in-flight ``table``.

    - ``si_code != SI_KERNEL``: not an int3 -> NOT_OURS;
    - ``site = ip - 1`` has no entry -> NOT_OURS (a debugger's breakpoint, or
      an int3 compiled into the program);
    - otherwise emulate the entry's instruction, which is the site's new one (or,
      for a trap handled late, the one it already holds): ``nop5`` resumes at
      ``site + 5``, ``jmp T`` at ``T``, ``call T`` pushes ``site + 5`` and
      resumes at ``T``.

    An entry always holds an instruction that passed ``decode_site`` when it was
    published (``apply_batch`` validates every patch first), so decoding it
    here cannot fail for a table written by textpoke.
    """
    if frame.si_code != SI_KERNEL:
        return NOT_OURS
    site = frame.ip - len(INT3)
    if site <= 0:
        return NOT_OURS  # address 0 marks an empty table slot; no site lives there
    insn = table.lookup(site)
    if insn is None:
        return NOT_OURS
    decoded = decode_site(site, insn)
    regs = frame.registers()
    memory = _RecordingMemory()
    if decoded.kind is InsnKind.NOP:
        out = emulate_jmp(regs, site + CALL_SIZE)
    else:
        assert decoded.target is not None
        if decoded.kind is InsnKind.CALL:
            out = emulate_call(regs, memory, decoded.target)
        else:
            out = emulate_jmp(regs, decoded.target)
    return Emulated(ip=out.ip, sp=out.sp, stores=tuple(memory.stores))


__all__ = [
    "NOT_OURS",
    "SI_KERNEL",
    "Emulated",
    "NotOurs",
    "SiteLookup",
    "TrapFrame",
    "handle_int3",
]
