"""Function-graph tracing: the exit of every traced call, by a hooked return address.

As ftrace's function_graph and uftrace do it: the entry routine of an fentry
site records the entry, pushes the function's real return address on a
per-thread *shadow stack* and puts the address of a return trampoline in its
place; when the function returns, the trampoline pops the frame, records the
exit and returns to the real address. All of it is generated code in the
target, without a lock or a syscall on the way.

Two parts, so that a return can come at any time, after the session ended or
after textpoke was killed:

- **the graph runtime**, one per process, installed by the first session that
  needs it and found again by the next ones (a memfd mapping named
  ``textpoke-graph``, never unmapped): the return trampoline, the lookup of a
  thread's shadow stack, the exception hooks; and, apart, the **shadow region**,
  a private anonymous mapping (a forked child gets a copy of its own, so it
  returns through its own frames and never touches its parent's):

      page 0            reserved
      table             SHADOW_THREADS entries of 16 bytes: thread pointer
                        (fs:0, the key), depth (u32)
      frames            per entry, SHADOW_DEPTH frames of 32 bytes: the stack
                        slot that held the return address (the key the return
                        trampoline looks for; 0 = free), the real return
                        address, the session's exit routine, the site word

- **the session's routines** (in its tracer region, see tracer.py): the entry
  routine ``graph_entry`` and the exit routine ``graph_exit``, which write the
  records into the session's ring, and only while the session is on (its
  flag page): a frame hooked by a session that has ended returns through the
  runtime all the same, without a record.

**The shadow stack, thread by thread.** Only a thread itself (and its signal
handlers, which nest) touches its entry, so no atomics are needed but the
claim of an entry (``lock cmpxchg`` on the key). A push reserves the frame
(depth + 1) before writing it, and writes its slot (the key) last; a pop reads
what it needs, clears the slots it pops, then lowers the depth: a signal
handler that runs in between pushes above, or at a frame already read.

**Returns the stack pointer decides.** The return trampoline knows the slot
its ``ret`` came from (``rsp - 8``) and looks for the frame with that slot from
the top down: the frames above it were left without a return (``longjmp``, an
exception, a thread that exited) and are popped with an UNWOUND record each. A
frame is never dropped on a guess, so a frame that will be returned through is
always found (a signal handler on another stack, a ``longjmp`` out of it: all
the same). A thread whose shadow stack is full is traced entry-only (counted).

**Exceptions.** The unwinder reads return addresses from the stack and would
stop at the trampoline (an uncaught exception: the program would terminate).
So every throw first restores the real return addresses of the throwing
thread's hooked frames (``graph_restore``, from hooks at the C++ runtime's
calls into the unwinder, installed once per process and kept for good), and a
catch (``__cxa_begin_catch`` in the traced object, hooked for the session)
pops the frames the exception left (UNWOUND) and hooks the rest again;
``pthread_exit`` restores the same way before its forced unwind.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .._errors import InjectionError, TextpokeError, UsageError
from ..poke.protocol import Patch
from ..poke.resident import PAGE, Resident
from .layout import KIND_SHIFT
from ..sites import SiteKind, mapped_object, sites_in_process
from ..target.process import Process
from ..target.syscalls import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, SYS_mmap
from ..x86.asm import Asm, R, fs, mem
from ..x86.insn import encode_call, encode_jmp, rel32_target

# -- the shadow region --------------------------------------------------------------------
SHADOW_THREADS = 1024
SHADOW_DEPTH = 16384
FRAME_SIZE = 32
F_SLOT, F_RET, F_EXIT, F_SITE = 0, 8, 16, 24
ENTRY_SIZE = 16
E_TP, E_DEPTH = 0, 8
#: Fibonacci hashing of the thread pointer: (tp * K) >> (64 - log2 threads).
HASH_K = 0x9E3779B97F4A7C15
PROBES = 16
MAP_NORESERVE = 0x4000  # the frames are reserved address space; a page costs memory once touched
#: Sizes tried in turn (threads, depth) when a kernel refuses the largest reservation.
_SHADOW_SIZES = ((SHADOW_THREADS, SHADOW_DEPTH), (256, 4096), (64, 1024))

#: A record's kind in r11 (the site word << 32): the kind's two bits.
KIND_LO_BIT = 32 + KIND_SHIFT
KIND_HI_BIT = KIND_LO_BIT + 1

# -- the runtime region ---------------------------------------------------------------------
RUNTIME_NAME = "textpoke-graph"
RUNTIME_MAGIC = int.from_bytes(b"TPKGRAF\x01", "little")
RUNTIME_VERSION = 1
#: Header at the start of the runtime's code (readable): magic u64, version u32, threads
#: u32, depth u32, hook stubs u32, shadow u64, then the routines' addresses (u64):
#: shadow_slot, graph_return, graph_restore, graph_rehook, graph_unwound, and the first
#: hook stub; from _HOOK_SITES, the site (u64) each hook stub is for.
_HEADER = struct.Struct("<QIIIIQQQQQQQ")
_HOOK_SITES = 96
#: Constants the routines read rip-relative (u64): table, frames, hash, return, counters.
_CONSTANTS = _HOOK_SITES + 8 * 32
_K_TABLE, _K_FRAMES, _K_HASH, _K_RETURN, _K_COUNTERS, _K_GLOBALS = (_CONSTANTS + 8 * i for i in range(6))
#: The C++ runtime's ``__cxa_get_globals`` (Itanium ABI: this thread's exception globals,
#: ``{caughtExceptions, unsigned uncaughtExceptions}``), for graph_rehook.
CXA_GET_GLOBALS = "__cxa_get_globals"
_UNCAUGHT = 8
_CODE = _CONSTANTS + 64
STUB_SIZE = 16
#: Hook stubs the runtime has room for (calls into the unwinder in the C++ runtime).
MAX_HOOKS = (_CONSTANTS - _HOOK_SITES) // 8
#: Where the C++ runtime calls into the unwinder (each such call site gets a restore hook).
UNWINDER_ENTRIES = ("_Unwind_RaiseException", "_Unwind_Resume_or_Rethrow")
CXX_RUNTIMES = ("libstdc++.so", "libc++abi.so")
#: Calls that the session hooks in the traced object: a catch begins (rehook), a thread
#: exits by a forced unwind (restore).
CATCH_ENTRY = "__cxa_begin_catch"
EXIT_ENTRIES = ("pthread_exit",)


def _page_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


@dataclass(frozen=True)
class ShadowGeometry:
    threads: int
    depth: int

    @property
    def table_offset(self) -> int:
        return PAGE

    @property
    def frames_offset(self) -> int:
        return _page_up(PAGE + self.threads * ENTRY_SIZE)

    @property
    def size(self) -> int:
        return self.frames_offset + self.threads * self.depth * FRAME_SIZE

    @property
    def shift(self) -> int:
        return 64 - (self.threads.bit_length() - 1)


# ---------------------------------------------------------------------------
# The runtime's code
# ---------------------------------------------------------------------------


def _emit_frames_of(a: Asm, *, entry: int, dest: int, geometry: ShadowGeometry, table: int, frames: int) -> None:
    """``dest`` = the first frame of table entry ``entry`` (an address)."""
    a.op("MOV_R64_RM64", dest, entry)
    a.op("SUB_R64_RM64", dest, mem(R.RIP, table))
    a.op("IMUL_R64_RM64_IMM32", dest, dest, geometry.depth * FRAME_SIZE // ENTRY_SIZE)
    a.op("ADD_R64_RM64", dest, mem(R.RIP, frames))


def _emit_shadow_slot(a: Asm, geometry: ShadowGeometry, *, table: int, hash_k: int) -> None:
    """``shadow_slot``: rax = thread pointer in, r8 = its table entry out (0: no room).

    Open addressing on the thread pointer: the first free entry met is claimed
    with ``lock cmpxchg`` (another thread may claim it at the same time: then the
    probe goes on). Clobbers rcx, rdx, rsi and flags; keeps rax."""
    a.label("shadow_slot")
    a.op("MOV_R64_RM64", R.RDX, R.RAX)
    a.op("MOV_R64_RM64", R.RSI, mem(R.RIP, table))
    a.op("MOV_R64_RM64", R.RCX, R.RAX)
    a.op("IMUL_R64_RM64", R.RCX, mem(R.RIP, hash_k))
    a.op("SHR_RM64_IMM8", R.RCX, geometry.shift)
    a.op("MOV_R32_IMM32", R.EAX, PROBES)
    a.label("slot_probe")
    a.op("MOV_R64_RM64", R.R8, R.RCX)
    a.op("SHL_RM64_IMM8", R.R8, 4)
    a.op("ADD_R64_RM64", R.R8, R.RSI)
    a.op("CMP_RM64_R64", mem(R.R8, E_TP), R.RDX)
    a.jump("JE_REL32_64", "slot_found")
    a.op("CMP_RM64_IMM8", mem(R.R8, E_TP), 0)
    a.jump("JNE_REL32_64", "slot_next")
    a.op("PUSH_R64", R.RAX)
    a.op("XOR_R32_RM32", R.EAX, R.EAX)
    a.op("CMPXCHG_RM64_R64", mem(R.R8, E_TP), R.RDX, lock=True)
    a.op("POP_R64", R.RAX)  # flags stay: ZF says whether this thread claimed it
    a.jump("JE_REL32_64", "slot_found")
    a.label("slot_next")
    a.op("INC_RM64", R.RCX)
    a.op("AND_RM64_IMM32", R.RCX, geometry.threads - 1)
    a.op("DEC_RM32", R.EAX)
    a.jump("JNE_REL32_64", "slot_probe")
    a.op("XOR_R32_RM32", R.R8D, R.R8D)
    a.label("slot_found")
    a.op("MOV_R64_RM64", R.RAX, R.RDX)
    a.op("RETNQ")


def _emit_return(a: Asm, geometry: ShadowGeometry, *, table: int, frames: int) -> None:
    """``graph_return``: a hooked function returned here (rsp = its slot + 8).

    1. keep rax and rdx (the return value) and a word for the real return address;
    2. find the thread's entry and, from the top down, the frame whose slot is
       ours (none: the trampoline cannot know where to go: ud2, which cannot
       happen while the frames are kept as described in the module docstring);
    3. the frames above it were left without a return: call each one's exit
       routine with an UNWOUND word, the depth still above them;
    4. read the frame's fields, clear the slots of it and above, lower the depth;
    5. its exit routine records the EXIT (return value as arg0, the real return
       address as the caller word); jump there (``jmp``, not ``ret``: see the code).
    Every register the return leaves live is kept (rax, rdx, and the callee-saved)."""
    a.label("graph_return")
    a.op("SUB_RM64_IMM8", R.RSP, 8)  # [rsp] = slot S: the real return address goes here
    a.op("PUSH_R64", R.RAX)
    a.op("PUSH_R64", R.RDX)
    a.op("MOV_R64_RM64", R.RAX, fs(0))
    a.jump("CALL_REL32_64", "shadow_slot")
    a.op("TEST_RM64_R64", R.R8, R.R8)
    a.jump("JE_REL32_64", "return_lost")
    a.op("LEA_R64_M", R.R10, mem(R.RSP, 16))  # S
    _emit_frames_of(a, entry=R.R8, dest=R.RCX, geometry=geometry, table=table, frames=frames)
    a.op("MOV_R32_RM32", R.R9D, mem(R.R8, E_DEPTH))
    a.label("return_search")
    a.op("SUB_RM32_IMM8", R.R9D, 1)
    a.jump("JS_REL32_64", "return_lost")
    a.op("MOV_R64_RM64", R.RSI, R.R9)
    a.op("SHL_RM64_IMM8", R.RSI, 5)
    a.op("ADD_R64_RM64", R.RSI, R.RCX)
    a.op("CMP_RM64_R64", mem(R.RSI, F_SLOT), R.R10)
    a.jump("JNE_REL32_64", "return_search")
    # Found at r9 (frame rsi): the real return address in place for our ret.
    a.op("MOV_R64_RM64", R.RAX, mem(R.RSI, F_RET))
    a.op("MOV_RM64_R64", mem(R.RSP, 16), R.RAX)
    a.op("MOV_R32_RM32", R.EDI, mem(R.R8, E_DEPTH))
    a.label("return_abandoned")
    a.op("SUB_RM32_IMM8", R.EDI, 1)
    a.op("CMP_R32_RM32", R.EDI, R.R9D)
    a.jump("JLE_REL32_64", "return_pop")
    a.op("MOV_R64_RM64", R.RDX, R.RDI)
    a.op("SHL_RM64_IMM8", R.RDX, 5)
    a.op("ADD_R64_RM64", R.RDX, R.RCX)
    a.op("BT_RM64_IMM8", mem(R.RDX, F_SITE), KIND_LO_BIT)
    a.jump("JAE_REL32_64", "return_abandoned")  # reported unwound already (graph_unwound)
    a.op("PUSH_R64", R.R9)
    a.op("PUSH_R64", R.RSI)
    a.op("MOV_R64_RM64", R.R11, mem(R.RDX, F_SITE))
    a.op("BTR_RM64_IMM8", R.R11, KIND_LO_BIT)  # ENTER (3) -> UNWOUND (2)
    a.op("MOV_R64_RM64", R.R9, mem(R.RDX, F_RET))
    a.op("XOR_R32_RM32", R.R10D, R.R10D)
    a.op("CALL_RM64", mem(R.RDX, F_EXIT))
    a.op("POP_R64", R.RSI)
    a.op("POP_R64", R.R9)
    a.jump("JMP_REL32_64", "return_abandoned")
    a.label("return_pop")
    a.op("MOV_R64_RM64", R.R11, mem(R.RSI, F_SITE))
    a.op("BTR_RM64_IMM8", R.R11, KIND_HI_BIT)  # ENTER (3) -> EXIT (1); a reported one: 0, no record
    a.op("MOV_R64_RM64", R.RAX, mem(R.RSI, F_EXIT))
    a.op("MOV_R32_RM32", R.EDI, mem(R.R8, E_DEPTH))
    a.label("return_clear")
    a.op("SUB_RM32_IMM8", R.EDI, 1)
    a.op("CMP_R32_RM32", R.EDI, R.R9D)
    a.jump("JL_REL32_64", "return_cleared")
    a.op("MOV_R64_RM64", R.RDX, R.RDI)
    a.op("SHL_RM64_IMM8", R.RDX, 5)
    a.op("MOV_RM64_IMM32", mem(R.RCX, index=R.RDX, displ=F_SLOT), 0)
    a.jump("JMP_REL32_64", "return_clear")
    a.label("return_cleared")
    a.op("MOV_RM32_R32", mem(R.R8, E_DEPTH), R.R9D)
    a.op("BT_RM64_IMM8", R.R11, KIND_LO_BIT)
    a.jump("JAE_REL32_64", "return_done")  # reported unwound (a frame on another stack): no exit now
    a.op("MOV_R64_RM64", R.R9, mem(R.RSP, 16))  # caller word: the real return address
    a.op("MOV_R64_RM64", R.R10, mem(R.RSP, 8))  # arg0: the return value
    a.op("CALL_RM64", R.RAX)
    a.label("return_done")
    a.op("POP_R64", R.RDX)
    a.op("POP_R64", R.RAX)
    # Not `ret`: the return predictor already lost the entry this return was paired with
    # (the function's own ret came here); a jmp leaves the next one for the caller's ret.
    a.op("LEA_R64_M", R.RSP, mem(R.RSP, 8))
    a.op("JMP_RM64", mem(R.RSP, -8))
    a.label("return_lost")
    a.op("UD2")


def _emit_unwound(a: Asm, *, table: int, frames: int, geometry: ShadowGeometry, returns: int) -> None:
    """``graph_unwound``: a frame with slot rsi is being entered (r8 = the thread's
    entry) and the frame on top has a slot at or below it: on the same stack that top
    frame is gone (a ``longjmp`` left it). Report each such frame, from the top down,
    with an UNWOUND record now, so that what follows does not look nested inside it,
    and mark it reported (its site word's kind: UNWOUND). It stays on the shadow stack:
    a frame on another stack (a signal handler's on sigaltstack) may look gone and still
    return; only a return pops frames. Stops at the first frame above rsi; skips frames
    reported before and frames whose push was cut short; a frame whose slot is rsi and
    still holds the trampoline is the tail-caller of the one entered, alive. Keeps every
    register."""
    a.label("graph_unwound")
    saved = (R.RAX, R.RCX, R.RDX, R.RDI, R.R9, R.R10, R.R11)
    for reg in saved:
        a.op("PUSH_R64", reg)
    _emit_frames_of(a, entry=R.R8, dest=R.RCX, geometry=geometry, table=table, frames=frames)
    a.op("MOV_R32_RM32", R.EDI, mem(R.R8, E_DEPTH))
    a.label("unwound_next")
    a.op("SUB_RM32_IMM8", R.EDI, 1)
    a.jump("JS_REL32_64", "unwound_done")
    a.op("MOV_R64_RM64", R.RDX, R.RDI)
    a.op("SHL_RM64_IMM8", R.RDX, 5)
    a.op("ADD_R64_RM64", R.RDX, R.RCX)
    a.op("MOV_R64_RM64", R.RAX, mem(R.RDX, F_SLOT))
    a.op("TEST_RM64_R64", R.RAX, R.RAX)
    a.jump("JE_REL32_64", "unwound_next")
    a.op("BT_RM64_IMM8", mem(R.RDX, F_SITE), KIND_LO_BIT)
    a.jump("JAE_REL32_64", "unwound_next")
    a.op("CMP_R64_RM64", R.RAX, R.RSI)
    a.jump("JA_REL32_64", "unwound_done")
    a.jump("JB_REL32_64", "unwound_gone")
    a.op("MOV_R64_RM64", R.R9, mem(R.RSI))
    a.op("CMP_R64_RM64", R.R9, mem(R.RIP, returns))
    a.jump("JE_REL32_64", "unwound_done")
    a.label("unwound_gone")
    a.op("MOV_R64_RM64", R.R11, mem(R.RDX, F_SITE))
    a.op("BTR_RM64_IMM8", R.R11, KIND_LO_BIT)  # ENTER (3) -> UNWOUND (2)
    a.op("MOV_RM64_R64", mem(R.RDX, F_SITE), R.R11)
    a.op("MOV_R64_RM64", R.R9, mem(R.RDX, F_RET))
    a.op("XOR_R32_RM32", R.R10D, R.R10D)
    a.op("CALL_RM64", mem(R.RDX, F_EXIT))
    a.jump("JMP_REL32_64", "unwound_next")
    a.label("unwound_done")
    for reg in reversed(saved):
        a.op("POP_R64", reg)
    a.op("RETNQ")


def _emit_restore(a: Asm, *, table: int, frames: int, geometry: ShadowGeometry, returns: int) -> None:
    """``graph_restore``: before an unwinder walks this thread's stack (a throw, a
    forced unwind), put the real return address back in every slot of its that
    still holds the trampoline, at or above the stack pointer. Called by a hook
    stub (``call graph_restore; jmp callee``): every register is kept."""
    a.label("graph_restore")
    saved = (R.RAX, R.RCX, R.RDX, R.RSI, R.RDI, R.R8)
    for reg in saved:
        a.op("PUSH_R64", reg)
    a.op("MOV_R64_RM64", R.RAX, fs(0))
    a.jump("CALL_REL32_64", "shadow_slot")
    a.op("TEST_RM64_R64", R.R8, R.R8)
    a.jump("JE_REL32_64", "restore_done")
    _emit_frames_of(a, entry=R.R8, dest=R.RCX, geometry=geometry, table=table, frames=frames)
    a.op("MOV_R32_RM32", R.EDI, mem(R.R8, E_DEPTH))
    a.label("restore_next")
    a.op("SUB_RM32_IMM8", R.EDI, 1)
    a.jump("JS_REL32_64", "restore_done")
    a.op("MOV_R64_RM64", R.RDX, R.RDI)
    a.op("SHL_RM64_IMM8", R.RDX, 5)
    a.op("ADD_R64_RM64", R.RDX, R.RCX)
    a.op("MOV_R64_RM64", R.RSI, mem(R.RDX, F_SLOT))
    a.op("CMP_R64_RM64", R.RSI, R.RSP)
    a.jump("JB_REL32_64", "restore_next")  # free (0), or below us: a frame that is gone
    a.op("MOV_R64_RM64", R.RAX, mem(R.RSI))
    a.op("CMP_R64_RM64", R.RAX, mem(R.RIP, returns))
    a.jump("JNE_REL32_64", "restore_next")
    a.op("MOV_R64_RM64", R.RAX, mem(R.RDX, F_RET))
    a.op("MOV_RM64_R64", mem(R.RSI), R.RAX)
    a.jump("JMP_REL32_64", "restore_next")
    a.label("restore_done")
    for reg in reversed(saved):
        a.op("POP_R64", reg)
    a.op("RETNQ")


def _emit_rehook(a: Asm, *, table: int, frames: int, geometry: ShadowGeometry, returns: int,
                 globals_: int) -> None:
    """``graph_rehook``: a catch block begins (its ``__cxa_begin_catch`` call).

    1. the frames on top of the shadow stack whose slots are below the stack
       pointer were left by the exception: pop each, with an UNWOUND record;
    2. the frames left (the catching function and its callers, alive) whose slot
       holds the real return address (restored when the exception was thrown)
       get the trampoline back, unless another exception is being unwound through
       them (``__cxa_get_globals()->uncaughtExceptions`` above 1).
    Called by a hook stub: every register is kept."""
    a.label("graph_rehook")
    saved = (R.RAX, R.RCX, R.RDX, R.RSI, R.RDI, R.R8, R.R9, R.R10, R.R11)
    for reg in saved:
        a.op("PUSH_R64", reg)
    a.op("MOV_R64_RM64", R.RAX, fs(0))
    a.jump("CALL_REL32_64", "shadow_slot")
    a.op("TEST_RM64_R64", R.R8, R.R8)
    a.jump("JE_REL32_64", "rehook_done")
    _emit_frames_of(a, entry=R.R8, dest=R.RCX, geometry=geometry, table=table, frames=frames)
    a.label("rehook_pop")
    a.op("MOV_R32_RM32", R.EDI, mem(R.R8, E_DEPTH))
    a.op("SUB_RM32_IMM8", R.EDI, 1)
    a.jump("JS_REL32_64", "rehook_again")
    a.op("MOV_R64_RM64", R.RDX, R.RDI)
    a.op("SHL_RM64_IMM8", R.RDX, 5)
    a.op("ADD_R64_RM64", R.RDX, R.RCX)
    a.op("MOV_R64_RM64", R.RSI, mem(R.RDX, F_SLOT))
    a.op("TEST_RM64_R64", R.RSI, R.RSI)
    a.jump("JE_REL32_64", "rehook_drop")
    a.op("CMP_R64_RM64", R.RSI, R.RSP)
    a.jump("JAE_REL32_64", "rehook_again")  # at or above us: alive
    a.label("rehook_drop")
    a.op("MOV_R64_RM64", R.R11, mem(R.RDX, F_SITE))
    a.op("BTR_RM64_IMM8", R.R11, KIND_LO_BIT)  # ENTER (3) -> UNWOUND (2)
    a.op("MOV_R64_RM64", R.R9, mem(R.RDX, F_RET))
    a.op("XOR_R32_RM32", R.R10D, R.R10D)
    a.op("MOV_R64_RM64", R.RAX, mem(R.RDX, F_EXIT))
    a.op("MOV_RM64_IMM32", mem(R.RDX, F_SLOT), 0)
    a.op("MOV_RM32_R32", mem(R.R8, E_DEPTH), R.EDI)
    a.op("TEST_RM64_R64", R.RSI, R.RSI)
    a.jump("JE_REL32_64", "rehook_pop")  # a frame never written (its push was cut short): no record
    a.op("BT_RM64_IMM8", R.R11, KIND_HI_BIT)
    a.jump("JAE_REL32_64", "rehook_pop")  # reported unwound already
    a.op("CALL_RM64", R.RAX)
    a.jump("JMP_REL32_64", "rehook_pop")
    a.label("rehook_again")
    # An exception caught while another one unwinds (a destructor's own try/catch): the
    # outer unwinding still walks the frames above us; they stay as restored. The one
    # being caught counts as uncaught until __cxa_begin_catch, which runs after us.
    a.op("CMP_RM64_IMM8", mem(R.RIP, globals_), 0)
    a.jump("JE_REL32_64", "rehook_unhooked")
    a.op("SUB_RM64_IMM8", R.RSP, 8)  # the stack 16-byte aligned for a C call
    a.op("CALL_RM64", mem(R.RIP, globals_))
    a.op("ADD_RM64_IMM8", R.RSP, 8)
    a.op("CMP_RM32_IMM8", mem(R.RAX, _UNCAUGHT), 1)
    a.jump("JA_REL32_64", "rehook_done")
    a.label("rehook_unhooked")
    a.op("MOV_R32_RM32", R.EDI, mem(R.R8, E_DEPTH))
    a.label("rehook_next")
    a.op("SUB_RM32_IMM8", R.EDI, 1)
    a.jump("JS_REL32_64", "rehook_done")
    a.op("MOV_R64_RM64", R.RDX, R.RDI)
    a.op("SHL_RM64_IMM8", R.RDX, 5)
    a.op("ADD_R64_RM64", R.RDX, R.RCX)
    a.op("MOV_R64_RM64", R.RSI, mem(R.RDX, F_SLOT))
    a.op("CMP_R64_RM64", R.RSI, R.RSP)
    a.jump("JB_REL32_64", "rehook_next")
    a.op("MOV_R64_RM64", R.RAX, mem(R.RSI))
    a.op("CMP_R64_RM64", R.RAX, mem(R.RDX, F_RET))
    a.jump("JNE_REL32_64", "rehook_next")
    a.op("MOV_R64_RM64", R.RAX, mem(R.RIP, returns))
    a.op("MOV_RM64_R64", mem(R.RSI), R.RAX)
    a.jump("JMP_REL32_64", "rehook_next")
    a.label("rehook_done")
    for reg in reversed(saved):
        a.op("POP_R64", reg)
    a.op("RETNQ")


def generate_runtime(*, base: int, shadow: int, geometry: ShadowGeometry,
                     hooks: Sequence[tuple[int, int]], get_globals: int = 0) -> tuple[bytes, dict[str, int]]:
    """The runtime's code placed at ``base``: header, constants, routines, then one
    hook stub per ``(site, callee)`` (``call graph_restore; jmp callee``)."""
    if len(hooks) > MAX_HOOKS:
        raise InjectionError(f"{len(hooks)} unwinder calls to hook; the graph runtime has room for {MAX_HOOKS}")
    k = {name: base + offset for name, offset in
         (("table", _K_TABLE), ("frames", _K_FRAMES), ("hash", _K_HASH), ("return", _K_RETURN),
          ("counters", _K_COUNTERS), ("globals", _K_GLOBALS))}
    a = Asm()
    _emit_shadow_slot(a, geometry, table=k["table"], hash_k=k["hash"])
    _emit_return(a, geometry, table=k["table"], frames=k["frames"])
    _emit_restore(a, table=k["table"], frames=k["frames"], geometry=geometry, returns=k["return"])
    _emit_rehook(a, table=k["table"], frames=k["frames"], geometry=geometry, returns=k["return"],
                 globals_=k["globals"])
    _emit_unwound(a, table=k["table"], frames=k["frames"], geometry=geometry, returns=k["return"])
    routines, labels = a.assemble(base + _CODE)
    stubs = base + _CODE + (len(routines) + STUB_SIZE - 1) // STUB_SIZE * STUB_SIZE
    size = _page_up(stubs - base + len(hooks) * STUB_SIZE)
    code = bytearray(b"\xcc" * size)
    code[_CODE : _CODE + len(routines)] = routines
    for i, (_, callee) in enumerate(hooks):
        at = stubs - base + i * STUB_SIZE
        body = encode_call(stubs + i * STUB_SIZE, labels["graph_restore"])
        body += encode_jmp(stubs + i * STUB_SIZE + len(body), callee)
        code[at : at + len(body)] = body
    struct.pack_into("<6Q", code, _CONSTANTS, shadow + geometry.table_offset, shadow + geometry.frames_offset,
                     HASH_K, labels["graph_return"], shadow, get_globals)
    _HEADER.pack_into(code, 0, RUNTIME_MAGIC, RUNTIME_VERSION, geometry.threads, geometry.depth, len(hooks),
                      shadow, labels["shadow_slot"], labels["graph_return"], labels["graph_restore"],
                      labels["graph_rehook"], labels["graph_unwound"], stubs)
    for i, (site, _) in enumerate(hooks):
        struct.pack_into("<Q", code, _HOOK_SITES + 8 * i, site)
    labels["stubs"] = stubs
    return bytes(code), labels


def runtime_code_size(hooks: int, geometry: ShadowGeometry) -> int:
    """Bytes of code a runtime with ``hooks`` stubs needs (the size of its routines does
    not depend on where they are placed: every address they use is rip-relative)."""
    code, labels = generate_runtime(base=0x1000_0000, shadow=0x2000_0000, geometry=geometry, hooks=[])
    return _page_up(labels["stubs"] - 0x1000_0000 + hooks * STUB_SIZE)


# ---------------------------------------------------------------------------
# The runtime in a target
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphRuntime:
    """A process's graph runtime: where its routines and shadow region are."""

    address: int
    shadow: int
    geometry: ShadowGeometry
    shadow_slot: int
    graph_return: int
    graph_restore: int
    graph_rehook: int
    graph_unwound: int
    stubs: int  # the first hook stub
    hook_sites: tuple[int, ...]  # the C++ runtime's calls into the unwinder, hook stub i for site i

    @property
    def counters(self) -> int:
        return self.shadow

    @property
    def code(self) -> range:
        """The runtime's code: a thread in its return path may be about to call a
        session's exit routine (it has popped the frame that named it)."""
        return range(self.address, self.address + runtime_code_size(len(self.hook_sites), self.geometry))

    def frames_returning_to(self, process: Process, code: range) -> int:
        """Frames on any thread's shadow stack whose exit routine lies in ``code`` (a
        session's tracer region): while there are any, that region must stay as it
        is (a return may call it at any time)."""
        g = self.geometry
        table = struct.unpack(f"<{2 * g.threads}Q", process.read(self.shadow + g.table_offset,
                                                                 g.threads * ENTRY_SIZE))
        found = 0
        for index in range(g.threads):
            tp, depth = table[2 * index], table[2 * index + 1] & 0xFFFF_FFFF
            if not tp or not depth:
                continue
            depth = min(depth, g.depth)
            start = self.shadow + g.frames_offset + index * g.depth * FRAME_SIZE
            words = struct.unpack(f"<{4 * depth}Q", process.read(start, depth * FRAME_SIZE))
            found += sum(1 for k in range(depth) if words[4 * k + F_SLOT // 8] and words[4 * k + F_EXIT // 8] in code)
        return found

    @classmethod
    def find(cls, process: Process) -> GraphRuntime | None:
        """The runtime an earlier session installed in ``process`` (or its parent, before
        a fork), if any."""
        for mapping in process.maps():
            if RUNTIME_NAME not in mapping.path or not mapping.executable:
                continue
            try:
                header = _HEADER.unpack(process.read(mapping.start, _HEADER.size))
            except TextpokeError:
                continue
            magic, version, threads, depth, hooks, shadow, slot, ret, restore, rehook, unwound, stubs = header
            if magic != RUNTIME_MAGIC:
                continue
            if version != RUNTIME_VERSION:
                raise UsageError(f"process {process.pid} holds a textpoke function-graph runtime of version "
                                 f"{version}; this textpoke knows version {RUNTIME_VERSION}",
                                 hint="trace it with the textpoke that traced it before, or with --entry-only")
            sites = struct.unpack(f"<{hooks}Q", process.read(mapping.start + _HOOK_SITES, 8 * hooks))
            return cls(mapping.start, shadow, ShadowGeometry(threads, depth), slot, ret, restore, rehook, unwound,
                       stubs, sites)
        return None

    @classmethod
    def install(cls, resident: Resident) -> GraphRuntime:
        """Map the shadow region and the runtime in the target; the runtime's code is
        placed near the C++ runtime's calls into the unwinder (rel32 reach for their
        hook stubs), whose patches (:attr:`hook_patches`) the caller applies in a batch
        of their own, before any frame is hooked, and keeps for good."""
        process = resident.process
        hooks = unwinder_calls(process.pid)
        shadow, geometry = _map_shadow(resident)
        near = min((site for site, _, _ in hooks), default=None)
        size = runtime_code_size(len(hooks), geometry)
        region = resident.map_shared(code_size=size, data_size=PAGE, near=near, name=RUNTIME_NAME)
        try:
            code, labels = generate_runtime(base=region.address, shadow=shadow, geometry=geometry,
                                            hooks=[(site, callee) for site, _, callee in hooks],
                                            get_globals=_cxx_function(process.pid, CXA_GET_GLOBALS))
            if len(code) > size:
                raise InjectionError(f"the graph runtime is {len(code)} bytes, more than the {size} mapped")
            region.local[: len(code)] = code
        finally:
            region.local.close()
        return cls(region.address, shadow, geometry, labels["shadow_slot"], labels["graph_return"],
                   labels["graph_restore"], labels["graph_rehook"], labels["graph_unwound"], labels["stubs"],
                   tuple(site for site, _, _ in hooks))

    def unwinder_hook_patches(self, process: Process) -> list[Patch]:
        """The batch that (re)places the hooks on the C++ runtime's calls into the unwinder
        (empty when they are all in place); the caller applies it before any frame is
        hooked, and keeps it for good (Session.keep). Refuses where an exception could
        not be unwound through a hooked frame: a C++ runtime loaded after this runtime
        was made, or a hook site holding something else."""
        calls = unwinder_calls(process.pid)
        if len(calls) > len(self.hook_sites) or {site for site, _, _ in calls} - set(self.hook_sites):
            raise UsageError(
                f"a C++ runtime was loaded into process {process.pid} after textpoke's function-graph runtime "
                "was installed there: an exception thrown through a traced frame could not be unwound",
                hint="trace entries only (--entry-only)")
        original = {site: insn for site, insn, _ in calls}
        patches = []
        for i, site in enumerate(self.hook_sites):
            hooked = encode_call(site, self.stubs + i * STUB_SIZE)
            now = process.read(site, len(hooked))
            if now == hooked:
                continue
            if now != original.get(site):
                raise UsageError(f"the C++ runtime's call into the unwinder at {site:#x} holds {now.hex()}, "
                                 "neither its own instruction nor textpoke's hook",
                                 hint="trace entries only (--entry-only)")
            patches.append(Patch(site=site, old=now, new=hooked))
        return patches


def unwinder_calls(pid: int) -> list[tuple[int, bytes, int]]:
    """(site, its original bytes, callee) of every call from a mapped C++ runtime into
    the unwinder (from the file: a site may hold textpoke's hook already)."""
    found: list[tuple[int, bytes, int]] = []
    for library in CXX_RUNTIMES:
        try:
            sites = sites_in_process(pid, path=library, kinds={SiteKind.CALL}, calls_to=UNWINDER_ENTRIES)
        except TextpokeError:
            continue  # not mapped
        for s in sites:
            original = s.file_insn or s.insn
            target = rel32_target(s.address, original)
            found.append((s.address, original, target))
    return found


def _cxx_function(pid: int, name: str) -> int:
    """Runtime address of a function of the mapped C++ runtime, 0 when there is none."""
    for library in CXX_RUNTIMES:
        try:
            obj, image = mapped_object(pid, path=library)
        except TextpokeError:
            continue
        for function in image.functions:
            if name in function.names:
                return obj.base + function.address
    return 0


def _map_shadow(resident: Resident) -> tuple[int, ShadowGeometry]:
    """The shadow region: private, anonymous, reserved without commitment; the largest
    size the kernel accepts."""
    error: InjectionError | None = None
    for threads, depth in _SHADOW_SIZES:
        geometry = ShadowGeometry(threads, depth)
        try:
            address = resident.syscall(SYS_mmap, 0, geometry.size, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            return address, geometry
        except InjectionError as exc:
            error = exc
    raise InjectionError(f"no room for textpoke's shadow stacks in process {resident.process.pid}: "
                         f"{error.message if error else ''}", hint="trace entries only (--entry-only)")


def hook_sites(pid: int, library: str | None) -> tuple[list[tuple[int, bytes, int]], list[tuple[int, bytes, int]]]:
    """The traced object's calls to ``__cxa_begin_catch`` (rehook) and to the calls that
    exit a thread by a forced unwind (restore): (site, bytes, callee) each."""
    def calls(names: Sequence[str]) -> list[tuple[int, bytes, int]]:
        try:
            sites = sites_in_process(pid, path=library, kinds={SiteKind.CALL}, calls_to=names)
        except TextpokeError:
            return []
        return [(s.address, s.insn, s.target) for s in sites if s.target is not None and not s.changed]

    return calls((CATCH_ENTRY,)), calls(EXIT_ENTRIES)


__all__ = [
    "CATCH_ENTRY",
    "FRAME_SIZE",
    "GraphRuntime",
    "KIND_HI_BIT",
    "KIND_LO_BIT",
    "SHADOW_DEPTH",
    "SHADOW_THREADS",
    "ShadowGeometry",
    "generate_runtime",
    "hook_sites",
    "unwinder_calls",
]
