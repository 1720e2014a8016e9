"""The kernel's int3 handler as it emulates calls (2019), as Python over ``struct pt_regs`` in emulated memory.

The entry code (machine code, :mod:`textpoke.model.kernel`) calls ``do_int3``
with a ``struct pt_regs *``; the scheduler runs :func:`do_int3` when a CPU reaches
that address and then lets the CPU execute the ``ret`` there.  Every read and
write below goes to the shared emulated memory through :class:`PtRegs`, so what
the entry code restores is exactly what this code left there.  The functions
mirror the kernel's, one per step:

``do_int3`` -> ``do_kernel_int3`` -> ``ftrace_int3_handler`` ->
``int3_emulate_call`` = ``int3_emulate_push`` + ``int3_emulate_jmp``.

Which ``int3_emulate_push`` runs is the variant's business (:class:`PushFlavor`):
the generic one writes below ``regs->sp`` (right on x86-64 with the gap, and on
x86-32 once frames are complete), the one proposed for x86-32 in 2019 (not
merged) moves the truncated frame down one word and returns the moved frame.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..x86.insn import CALL_SIZE, INT3
from .isa import Arch, Isa
from .kernel import Kernel
from .machine import Memory


class HandlerFlavor(enum.Enum):
    """What the handler does for a site it owns."""

    #: Since 2019: emulate the instruction the site is becoming.
    EMULATE = "emulate"
    #: Before 2019: skip the 5-byte instruction (``regs->ip += 4``).
    SKIP = "skip"


class PushFlavor(enum.Enum):
    """How ``int3_emulate_push`` makes room on the interrupted stack."""

    #: ``regs->sp -= word; *regs->sp = val`` -- needs room between frame and stack.
    REGS_SP = "regs->sp"
    #: x86-32 as proposed in 2019 (not merged): move the truncated frame down a word,
    #: store in its sp slot.
    MOVE_FRAME = "move-frame"


class Action(enum.Enum):
    """What the handler decided for one trap."""

    NOT_OURS = "not ours"
    SKIP = "skip"
    JMP = "jmp"
    CALL = "call"


@dataclass(frozen=True)
class Int3Outcome:
    """One run of do_int3: the frame in, the frame out, and what was emulated."""

    regs_in: int
    regs_out: int
    action: Action
    site: int
    #: Where the CPU is meant to resume (the emulated instruction's target).
    resume_ip: int | None = None
    #: The return address pushed for an emulated call.
    pushed: int | None = None
    #: do_int3's WARN_ON: the x86-64 frame moved (it never may: iret uses it in place).
    warned: bool = False

    def describe(self) -> str:
        if self.action is Action.NOT_OURS:
            return "not ours"
        text = f"{self.action.value} -> {self.resume_ip:#x}"
        if self.pushed is not None:
            text += f", pushed {self.pushed:#x}"
        if self.regs_out != self.regs_in:
            text += f", frame moved {self.regs_in:#x} -> {self.regs_out:#x}"
        return text


class PtRegs:
    """A ``struct pt_regs *``: field access at fixed offsets, like the C code.

    Nothing here knows whether the frame is truncated: on x86-32 a same-privilege
    trap frame has no sp/ss, and ``regs.sp`` then reads and writes the interrupted
    stack's top word, exactly as the C field access would.
    """

    __slots__ = ("addr", "isa", "mem")

    def __init__(self, mem: Memory, isa: Isa, addr: int) -> None:
        self.mem, self.isa, self.addr = mem, isa, addr

    def get(self, field: str) -> int:
        raw = self.mem.read(self.addr + self.isa.off(field), self.isa.word)
        return self.isa.word_struct.unpack(raw)[0]

    def set(self, field: str, value: int) -> None:
        self.mem.write(self.addr + self.isa.off(field), self.isa.word_struct.pack(value & self.isa.mask))


@dataclass(frozen=True)
class HandlerContext:
    """What the handler needs besides pt_regs: memory, the kernel's data words, flavors."""

    mem: Memory
    kernel: Kernel
    handler: HandlerFlavor
    push: PushFlavor

    @property
    def isa(self) -> Isa:
        return self.kernel.isa

    def word(self, addr: int) -> int:
        return self.isa.word_struct.unpack(self.mem.read(addr, self.isa.word))[0]

    def store(self, addr: int, value: int) -> None:
        self.mem.write(addr, self.isa.word_struct.pack(value & self.isa.mask))


@dataclass
class _Emulation:
    """Scratch record of what the emulate helpers did (filled as they run)."""

    action: Action = Action.NOT_OURS
    resume_ip: int | None = None
    pushed: int | None = None


def do_int3(ctx: HandlerContext, regs_addr: int) -> Int3Outcome:
    """The C entry point the int3 entry code calls.

    1. ``do_kernel_int3(regs)`` decides and emulates, returning the frame to
       return through (the same one, or on x86-32 the moved one);
    2. x86-64: the entry code returns through the frame it built, so a moved frame
       would be a bug: WARN_ON_ONCE(new != regs).  x86-32: return it; the entry
       code loads esp from it (``movl %eax,%esp``).
    """
    regs = PtRegs(ctx.mem, ctx.isa, regs_addr)
    emu = _Emulation()
    site = (regs.get("ip") - len(INT3)) & ctx.isa.mask
    new = do_kernel_int3(ctx, regs, emu)
    out = regs_addr if new is None else new.addr
    warned = ctx.isa.arch is Arch.X86_64 and out != regs_addr
    return Int3Outcome(
        regs_in=regs_addr,
        regs_out=out,
        action=emu.action if new is not None else Action.NOT_OURS,
        site=site,
        resume_ip=emu.resume_ip,
        pushed=emu.pushed,
        warned=warned,
    )


def do_kernel_int3(ctx: HandlerContext, regs: PtRegs, emu: _Emulation) -> PtRegs | None:
    """Kernel-mode #BP: offer the trap to ftrace while it modifies code.

    1. a trap from user mode is not ours (None: the kernel goes on to send SIGTRAP);
    2. ``modifying_ftrace_code`` is set by the patcher before its first int3 and
       cleared after the sync that follows its last byte (the other half of this
       read): only then may ftrace claim a trap;
    3. ``ftrace_int3_handler`` claims it or not.
    """
    if regs.get("cs") & 3:
        return None
    if ctx.word(ctx.kernel.modifying_ftrace_code) == 0:
        return None
    return ftrace_int3_handler(ctx, regs, emu)


def ftrace_location(ctx: HandlerContext, ip: int) -> bool:
    """Is ``ip`` an fentry site (``__mcount_loc``, in emulated memory)?"""
    count = ctx.word(ctx.kernel.mcount_count)
    return any(ctx.word(ctx.kernel.mcount_loc + i * ctx.isa.word) == ip for i in range(count))


def ftrace_int3_handler(ctx: HandlerContext, regs: PtRegs, emu: _Emulation) -> PtRegs | None:
    """ftrace's int3 handler since 2019, which emulates calls (``SKIP``: the one before it).

    - ``ip - 1`` is an fentry site: emulate ``call ftrace_regs_caller`` -- for any
      fentry site, old or new, nop or call: the regs caller calls the current
      callback through its own site, so the call happens exactly once;
    - ``ip - 1`` is ``ftrace_update_func`` (the callback site being changed, published
      by the patcher before its int3): emulate ``call ftrace_update_func_call``, or
      jump over the site when that is 0 (the site is becoming a nop);
    - otherwise not ours.
    """
    ip = (regs.get("ip") - len(INT3)) & ctx.isa.mask
    ours_fentry = ftrace_location(ctx, ip)
    ours_caller = not ours_fentry and ip == ctx.word(ctx.kernel.ftrace_update_func)
    if not (ours_fentry or ours_caller):
        return None
    if ctx.handler is HandlerFlavor.SKIP:
        # Treat the site as a nop while it changes: right for nop <-> call,
        # loses the call for call A -> call B.
        new_ip = regs.get("ip") + CALL_SIZE - len(INT3)
        regs.set("ip", new_ip)
        emu.action, emu.resume_ip = Action.SKIP, new_ip
        return regs
    if ours_fentry:
        return int3_emulate_call(ctx, regs, ctx.kernel.sym("ftrace_regs_caller"), emu)
    func = ctx.word(ctx.kernel.ftrace_update_func_call)
    if func == 0:
        int3_emulate_jmp(regs, ip + CALL_SIZE, emu)
        return regs
    return int3_emulate_call(ctx, regs, func, emu)


def int3_emulate_jmp(regs: PtRegs, target: int, emu: _Emulation) -> None:
    """``regs->ip = target``."""
    regs.set("ip", target)
    emu.resume_ip = target
    if emu.action is Action.NOT_OURS:
        emu.action = Action.JMP


def int3_emulate_push(ctx: HandlerContext, regs: PtRegs, value: int) -> PtRegs:
    """Push ``value`` on the interrupted stack; return the frame to return through.

    ``REGS_SP``: ``regs->sp -= word; *(unsigned long *)regs->sp = value``.  On
    x86-64 the entry's gap makes that store land between the frame copy and the
    interrupted stack.  Without the gap it lands on the frame when the trap came
    at a 16-byte aligned rsp (the frame then ends right at the old rsp).  On a
    truncated x86-32 frame ``regs->sp`` *is* the interrupted stack's top word.

    ``MOVE_FRAME`` (x86-32 as proposed in 2019): the saved registers (every field before ``sp``)
    move down one word; the value goes into the moved frame's ``sp`` field,
    which is the word just below the interrupted stack: its new top.  The caller
    must return the moved frame to the entry code, which switches esp to it.
    """
    word = ctx.isa.word
    if ctx.push is PushFlavor.REGS_SP:
        sp = regs.get("sp") - word
        regs.set("sp", sp)
        ctx.store(sp, value)
        return regs
    size = ctx.isa.off("sp")
    new = PtRegs(ctx.mem, ctx.isa, regs.addr - word)
    ctx.mem.write(new.addr, ctx.mem.read(regs.addr, size))    # memmove, overlapping down
    new.set("sp", value)
    return new


def int3_emulate_call(ctx: HandlerContext, regs: PtRegs, func: int, emu: _Emulation) -> PtRegs:
    """Push the return address ``ip - 1 + 5`` and jump to ``func``."""
    ret = (regs.get("ip") - len(INT3) + CALL_SIZE) & ctx.isa.mask
    regs = int3_emulate_push(ctx, regs, ret)
    emu.action, emu.pushed = Action.CALL, ret
    int3_emulate_jmp(regs, func, emu)
    return regs
