"""The signal frame a borrowed thread restores itself from if textpoke dies.

While textpoke runs syscalls in a borrowed thread, the thread's own state
waits in an x86-64 ``rt_sigframe`` on its own stack, below its red zone (where
the kernel would put a signal frame), and every instruction the thread can
reach without us ends in ``rt_sigreturn`` on that frame:

* the injected syscalls run at a ``syscall; ret`` gadget with the frame's
  first word (``pretcode``) naming a ``mov rax, 15; syscall`` gadget, so the
  ``ret`` after the syscall lands in rt_sigreturn;
* the clone of the agent runs in our stub page, whose parent path falls
  through into rt_sigreturn.

The kernel detaches the thread if the tool is killed (syscall tracing is
cleared then; single-stepping is not, which is why textpoke never single-steps
a borrowed thread), so the thread runs on from wherever we left it, reaches
rt_sigreturn and continues with its own registers, FPU/SSE/AVX state and
signal mask.

rt_sigreturn differs from a ptrace restore in three ways, all handled here:

1. it sets ``orig_rax = -1``, so the kernel's syscall-restart fix-up for an
   interrupted syscall (rax = -ERESTART*) would not happen: the frame holds
   the state *after* that fix-up (rip back on the ``syscall``, rax = its
   number);
2. it resets the thread's restart block (a later ``restart_syscall`` returns
   EINTR), so a syscall that would resume through restart_syscall
   (nanosleep, poll, futex with a timeout) is issued again with its original
   arguments instead: it may wait longer, never return EINTR;
3. it also restores the alternate signal stack from the frame; ours carries
   invalid flags, so that sigaltstack fails (EINVAL, ignored by the kernel)
   and the thread keeps its own.

Pure logic: the borrow (inject.py) reads the registers, XSAVE area and mask
and writes the bytes.
"""

from __future__ import annotations

import functools
import struct

from . import _ptrace
from ._ptrace import Regs

ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
SYS_restart_syscall = 219
SYSCALL_INSN_SIZE = 2

RED_ZONE = 128  # bytes below rsp that a leaf function may use (SysV ABI)
XSTATE_ALIGN = 64  # XRSTOR's alignment (the kernel restores straight from user memory)

FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
FP_XSTATE_MAGIC2_SIZE = 4
FXSAVE_SIZE = 512
SW_BYTES = 464  # struct _fpx_sw_bytes, in the FXSAVE area's software-reserved bytes
XSTATE_MIN = FXSAVE_SIZE + 64  # legacy area + XSAVE header
XSAVE_HEADER = FXSAVE_SIZE  # its first word: XSTATE_BV, the features not in their initial state
XFEATURES_LEGACY = 0b11  # x87 and SSE, in the legacy area

UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4
SS_FLAGS_INVALID = 4  # not 0, SS_ONSTACK or SS_DISABLE: sigaltstack refuses it

# struct rt_sigframe { char *pretcode; struct ucontext uc; struct siginfo info; }
PRETCODE = 0
UCONTEXT = 8
UC_FLAGS = UCONTEXT + 0
UC_STACK = UCONTEXT + 16  # stack_t {ss_sp, ss_flags (int, padded), ss_size}
UC_MCONTEXT = UCONTEXT + 40  # struct sigcontext, 256 bytes
UC_SIGMASK = UCONTEXT + 296
SIGINFO = UCONTEXT + 304
FRAME_SIZE = SIGINFO + 128

#: struct sigcontext (x86-64) up to ``fpstate``: general registers in the
#: kernel's order, then rip, eflags, cs/gs/fs/ss (u16 each), err, trapno,
#: oldmask, cr2, fpstate.
_SIGCONTEXT_REGS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                    "rdi", "rsi", "rbp", "rbx", "rdx", "rax", "rcx", "rsp", "rip", "eflags")
_SIGCONTEXT = struct.Struct("<18Q4H5Q")

_RESTARTS = {-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND}
_U64 = 0xFFFF_FFFF_FFFF_FFFF


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def resumed_state(regs: Regs, *, restart_block_intact: bool) -> Regs:
    """The registers a stopped thread resumes with when no signal is delivered:
    the kernel's syscall-restart fix-up applied, ``orig_rax = -1``.

    ``restart_block_intact``: the thread's restart block still describes its
    interrupted syscall (a ptrace restore), so ERESTART_RESTARTBLOCK resumes
    through restart_syscall as the kernel would; False (after rt_sigreturn,
    which resets it): the syscall is issued again instead."""
    nr, result = _signed(regs.orig_rax), _signed(regs.rax)
    rewound = (regs.rip - SYSCALL_INSN_SIZE) & _U64
    if nr >= 0 and result in _RESTARTS:
        return regs._replace(rip=rewound, rax=regs.orig_rax, orig_rax=_U64)
    if nr >= 0 and result == -ERESTART_RESTARTBLOCK:
        again = SYS_restart_syscall if restart_block_intact else regs.orig_rax
        return regs._replace(rip=rewound, rax=again, orig_rax=_U64)
    return regs._replace(orig_rax=_U64)


def frame_size(xstate_size: int) -> int:
    """Bytes of a frame carrying an XSAVE area of ``xstate_size`` bytes."""
    return _xstate_offset() + xstate_size + FP_XSTATE_MAGIC2_SIZE


def _xstate_offset() -> int:
    return -(-FRAME_SIZE // XSTATE_ALIGN) * XSTATE_ALIGN


def place(rsp: int, size: int) -> int:
    """Where a frame of ``size`` bytes goes below ``rsp``: under the red zone,
    64-byte aligned (so the XSAVE area inside it is too)."""
    return (rsp - RED_ZONE - size) & ~(XSTATE_ALIGN - 1)


def _signal_xstate(xstate: bytes, xfeatures: int) -> bytes:
    """The XSAVE area as a signal frame carries it: software bytes saying how
    big it is and which features it holds, and the second magic after it
    (without them the kernel would restore x87/SSE only and reset AVX)."""
    if len(xstate) < XSTATE_MIN:
        raise ValueError(f"XSAVE area of {len(xstate)} bytes is too small")
    area = bytearray(xstate)
    struct.pack_into("<IIQI28x", area, SW_BYTES, FP_XSTATE_MAGIC1, len(xstate) + FP_XSTATE_MAGIC2_SIZE,
                     xfeatures, len(xstate))
    return bytes(area) + struct.pack("<I", FP_XSTATE_MAGIC2)


#: XSAVE feature number -> (offset, size) of its area in the standard format.
XsaveLayout = dict[int, tuple[int, int]]


@functools.cache
def xsave_layout() -> XsaveLayout:
    """This CPU's user-state XSAVE features beyond x87/SSE: where each one's area is
    in the standard format (CPUID leaf 0xD, sub-leaf = feature; supervisor state,
    ECX bit 0, is never in a signal frame)."""
    xcr0 = _ptrace.cpuid(0xD, 0)[0] | _ptrace.cpuid(0xD, 1)[3] << 32  # user features the OS enabled
    layout: XsaveLayout = {}
    for feature in range(2, 64):
        if xcr0 >> feature & 1:
            size, offset, flags, _ = _ptrace.cpuid(0xD, feature)
            if size and not flags & 1:
                layout[feature] = (offset, size)
    return layout


def fit(xstate: bytes, layout: XsaveLayout) -> bytes:
    """The XSAVE area from PTRACE_GETREGSET cut to what the thread's own signal frame
    may carry, its features word (ptrace's XCR0) narrowed to what the cut area holds.

    ptrace gives every feature the kernel supports, AMX's 8 KiB of tile data
    included, but rt_sigreturn takes an area no larger than the thread's signal
    frame size (which leaves AMX out unless the thread asked for it) and restores a
    larger one as x87/SSE only: AVX state reset. So the area ends with the last
    feature the thread has in use (XSTATE_BV), which every frame of the thread holds;
    features past it were in their initial state and stay so."""
    if len(xstate) < XSTATE_MIN:
        raise ValueError(f"XSAVE area of {len(xstate)} bytes is too small")
    in_use = struct.unpack_from("<Q", xstate, XSAVE_HEADER)[0]
    end = max([XSTATE_MIN] + [offset + size for feature, (offset, size) in layout.items() if in_use >> feature & 1])
    if end > len(xstate):
        raise ValueError(f"XSAVE area of {len(xstate)} bytes lacks features in use ({in_use:#x})")
    covered = XFEATURES_LEGACY | sum(1 << feature for feature, (offset, size) in layout.items() if offset + size <= end)
    area = bytearray(xstate[:end])
    struct.pack_into("<Q", area, SW_BYTES, xfeatures_of(xstate) & covered)
    return bytes(area)


def xfeatures_of(xstate: bytes) -> int:
    """The features an XSAVE area from PTRACE_GETREGSET covers: ptrace puts
    XCR0 in the first software-reserved word."""
    return struct.unpack_from("<Q", xstate, SW_BYTES)[0]


def build(regs: Regs, *, xstate: bytes, sigmask: int, at: int, pretcode: int) -> bytes:
    """The frame to write at ``at``: rt_sigreturn with rsp = ``at + 8`` resumes
    the thread as :func:`resumed_state` describes (restart block reset).

    ``pretcode``: the word at ``at``, where a ``ret`` with rsp = ``at`` goes
    (the address of a rt_sigreturn gadget)."""
    state = resumed_state(regs, restart_block_intact=False)
    fpstate = at + _xstate_offset()
    frame = bytearray(_xstate_offset())
    struct.pack_into("<Q", frame, PRETCODE, pretcode)
    struct.pack_into("<Q", frame, UC_FLAGS, UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS)
    struct.pack_into("<QiiQ", frame, UC_STACK, 0, SS_FLAGS_INVALID, 0, 0)
    _SIGCONTEXT.pack_into(frame, UC_MCONTEXT, *(getattr(state, name) & _U64 for name in _SIGCONTEXT_REGS),
                          state.cs, 0, 0, state.ss, 0, 0, 0, 0, fpstate)
    struct.pack_into("<Q", frame, UC_SIGMASK, sigmask)
    return bytes(frame) + _signal_xstate(xstate, xfeatures_of(xstate))


__all__ = ["build", "fit", "frame_size", "place", "resumed_state", "xfeatures_of", "xsave_layout"]
