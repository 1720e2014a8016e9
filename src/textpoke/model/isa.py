"""The two ISAs of the model: word size, unicorn mode, registers, ``struct pt_regs``.

Everything that differs between the x86-64 and the x86-32 kernel path, as data:
the rest of the model is written once and reads these facts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from unicorn import UC_MODE_32, UC_MODE_64
from unicorn import x86_const as ux

from .names import Arch


#: EFLAGS.IF: an interrupt gate clears it, so a CPU in the int3 path takes no IPI.
FLAG_IF = 0x200
#: EFLAGS.TF: cleared by every trap delivery.
FLAG_TF = 0x100
#: EFLAGS with the always-one bit and IF set: kernel code running with interrupts on.
INITIAL_FLAGS = 0x202


@dataclass(frozen=True)
class Isa:
    """Facts about one ISA that the machine, the handler and the checks need."""

    arch: Arch
    bits: int
    word: int
    uc_mode: int
    reg_pc: int
    reg_sp: int
    reg_flags: int
    reg_cs: int
    reg_ss: int
    #: Register holding the ``struct pt_regs *`` argument when the entry calls do_int3.
    reg_regs_arg: int
    #: Register holding do_int3's return value (the frame to return through, x86-32).
    reg_ret: int
    #: General registers an int3 must give back unchanged (name, unicorn id).
    gprs: tuple[tuple[str, int], ...]
    #: Registers shown in annotated traces besides ip and sp.
    trace_regs: tuple[tuple[str, int], ...]
    #: ``struct pt_regs`` fields, lowest address first.
    pt_regs: tuple[str, ...]
    #: Does a same-privilege trap push ss:sp?  (x86-64 always does; x86-32 does not.)
    hw_pushes_sp: bool
    #: The CPU aligns the stack pointer to this before pushing a trap frame.
    frame_align: int
    _offsets: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._offsets.update({name: i * self.word for i, name in enumerate(self.pt_regs)})

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def word_struct(self) -> struct.Struct:
        return _WORD_STRUCTS[self.word]

    def off(self, name: str) -> int:
        """Offset of a ``struct pt_regs`` field."""
        return self._offsets[name]

    @property
    def hw_frame(self) -> tuple[str, ...]:
        """The pt_regs fields the CPU itself pushes on a same-privilege trap."""
        return ("ip", "cs", "flags", "sp", "ss") if self.hw_pushes_sp else ("ip", "cs", "flags")

    @property
    def trap_frame_size(self) -> int:
        return len(self.hw_frame) * self.word


_WORD_STRUCTS = {8: struct.Struct("<Q"), 4: struct.Struct("<I")}

X86_64 = Isa(
    arch=Arch.X86_64,
    bits=64,
    word=8,
    uc_mode=UC_MODE_64,
    reg_pc=ux.UC_X86_REG_RIP,
    reg_sp=ux.UC_X86_REG_RSP,
    reg_flags=ux.UC_X86_REG_EFLAGS,
    reg_cs=ux.UC_X86_REG_CS,
    reg_ss=ux.UC_X86_REG_SS,
    reg_regs_arg=ux.UC_X86_REG_RDI,
    reg_ret=ux.UC_X86_REG_RAX,
    gprs=tuple(
        (name, getattr(ux, f"UC_X86_REG_{name.upper()}"))
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        )
    ),
    trace_regs=(("rax", ux.UC_X86_REG_RAX), ("rdi", ux.UC_X86_REG_RDI)),
    pt_regs=(
        "r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8",
        "ax", "cx", "dx", "si", "di", "orig_ax", "ip", "cs", "flags", "sp", "ss",
    ),
    hw_pushes_sp=True,
    frame_align=16,
)

I386 = Isa(
    arch=Arch.I386,
    bits=32,
    word=4,
    uc_mode=UC_MODE_32,
    reg_pc=ux.UC_X86_REG_EIP,
    reg_sp=ux.UC_X86_REG_ESP,
    reg_flags=ux.UC_X86_REG_EFLAGS,
    reg_cs=ux.UC_X86_REG_CS,
    reg_ss=ux.UC_X86_REG_SS,
    # The 32-bit kernel is built with -mregparm=3: the first argument is in eax.
    reg_regs_arg=ux.UC_X86_REG_EAX,
    reg_ret=ux.UC_X86_REG_EAX,
    gprs=tuple(
        (name, getattr(ux, f"UC_X86_REG_{name.upper()}"))
        for name in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")
    ),
    trace_regs=(("eax", ux.UC_X86_REG_EAX), ("edx", ux.UC_X86_REG_EDX)),
    pt_regs=(
        "bx", "cx", "dx", "si", "di", "bp", "ax", "ds", "es", "fs", "gs",
        "orig_ax", "ip", "cs", "flags", "sp", "ss",
    ),
    hw_pushes_sp=False,
    frame_align=1,
)


def isa_for(arch: Arch) -> Isa:
    return X86_64 if arch is Arch.X86_64 else I386
