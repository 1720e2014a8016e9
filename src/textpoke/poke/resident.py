"""The resident part: what textpoke leaves *in the target* so it survives us.

Two shared mappings (memfds) are created inside the target by a borrowed
thread, and mapped by the tool too:

- the control region (RW in both): header, the agent's mailbox, statistics,
  the SIGTRAP disposition that was there before us, and the in-flight table;
- the code region (RX in the target, RW only in the tool, so no page of the
  target is ever writable and executable): the SIGTRAP handler, its restorer,
  the sync agent and the stub that starts it.

The handler is :func:`textpoke.poke.spec.handle_int3` in machine code; the
agent is a thread of the target (all signals blocked) that sleeps on a futex in
the mailbox and runs the syscalls the tool posts: membarrier SYNC_CORE (the
sync of the batch protocol), and the memfd/mmap calls that map more code.
Nothing here is ever unmapped: a thread that trapped long ago still finds its
handler and its table entry, and the target keeps running when the tool is gone.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from .._errors import (BusyError, InjectionError, TargetError, TargetExited, TargetReplaced, TargetStopped, TextpokeError,
                       UsageError)
from ..target import _ptrace
from ..target import syscalls as sc
from ..target.inject import BorrowedThread
from ..target.process import Process, thread_cpu_ns
from ..target.maps import DEFAULT_REACH, find_free_near
from ..x86.asm import Asm, Imm64, R, mem
from ..x86.insn import CALL_OPCODE, CALL_SIZE, INT3_BYTE, JMP_OPCODE, rel32_targets
from .ledger import Ledger
from .table import HASH_MULTIPLIER, SiteTable

MAGIC = 0x31454B4F50545854  # b"TXTPOKE1" little-endian
VERSION = 3  # 2: the ledger (originals, baselines) follows the table; 3: the agent heals a killed batch
REGION_NAME = "textpoke"
#: The memfd name of a hot-fix's code and data (hotfix/apply.py): code of the program's now,
#: whose sites may be traced (poke/safety.py lets sites be there).
FIX_CODE_NAME = "textpoke-fix"
AGENT_NAME = "textpoke-agent"  # the agent thread's name (comm), as ps -T and top show it
PAGE = 4096

# -- control region layout (the contract between tool and resident code) ----
HDR_MAGIC = 0x000  # u64
HDR_VERSION = 0x008  # u32
HDR_SIZE = 0x00C  # u32: offset of the table (= header size)
HDR_TABLE_CAPACITY = 0x010  # u64
HDR_CTL_ADDR = 0x018  # u64: where the target maps this region
HDR_CTL_SIZE = 0x020  # u64
HDR_CODE_ADDR = 0x028  # u64
HDR_CODE_SIZE = 0x030  # u64
HDR_AGENT_TID = 0x038  # u32, written by the agent when it runs
HDR_READY = 0x03C  # u32 futex: the tool sets it once code and header are written
HDR_ALL_SIGNALS = 0x040  # u64: a sigset with every signal, for the agent
HDR_FRONT = 0x048  # u32: the handler copy SIGTRAP was last given to (safety.ensure_handler)
HDR_PREPARED = 0x04C  # u32: PREPARED_* bits, what an attach need not do again in this process
# Written by the install stub's new thread, before the tool writes the rest:
HDR_INSTALL_STUB = 0x050  # u64: the stub pages, unmapped once the agent runs (0 then)
HDR_INSTALL_FD = 0x058  # u32: the target's descriptor of this memfd, kept open (close-on-exec) so a
#                           later session opens the region through /proc/PID/fd, no privilege needed
HDR_INSTALL_TID = 0x05C  # u32: the new thread
HDR_INSTALL_MAGIC = 0x060  # u64: MAGIC once the fields above are written
# The watch (poke/guard.py): while a batch has int3s in place the agent watches
# the tool through a pidfd and, if the tool dies, finishes the batch itself.
WATCH_STATE = 0x068  # u32 futex: one of the WATCH_* states below
WATCH_PIDFD = 0x06C  # u32: the target's pidfd of the tool that arms the watch
WATCH_PID = 0x070  # u32: that tool's pid
MEM_FD = 0x074  # u32: the target's descriptor of /proc/self/mem (the agent's way to write text)
#: u32, 1 while every site the ledger knows holds its baseline and none is in flight: set by a
#: session that ended cleanly (reverted or committed everything), cleared before a session
#: changes anything. An attach that finds it set has nothing to recover and surveys nothing.
HDR_CLEAN = 0x078
WATCH_PIDFD_INO = 0x0C8  # u64: st_ino of WATCH_PIDFD when it was opened (the agent checks it)
MEM_INO = 0x0D0  # u64: st_ino of MEM_FD when it was opened
HEAL_BATCHES = 0x0D8  # u64: batches the agent finished for a tool that died
HEAL_SITES = 0x0E0  # u64: sites the last of them had in flight
HEAL_PID = 0x0E8  # u32: the tool that died (the last one the agent finished for)
HEAL_FAILED = 0x0EC  # u32: writes of the agent that failed (a site unmapped meanwhile)
HEAL_POLL_TS = 0x0F0  # struct timespec: how long the armed agent sleeps between looks at the tool
MBX_REQUEST = 0x080  # u32 futex: sequence number of the last posted request
MBX_DONE = 0x084  # u32 futex: sequence number of the last finished request
MBX_NR = 0x088  # u64
MBX_ARGS = 0x090  # 6 x u64
MBX_RESULT = 0x0C0  # i64
STAT_EMULATED = 0x100  # u64: traps the handler emulated
STAT_NOT_OURS = 0x108  # u64: traps passed on to the program's disposition
STAT_SYNCS = 0x110  # u64: membarrier calls the agent made
STAT_REQUESTS = 0x118  # u64: requests the agent served
HEAL_BUF = 0x120  # 8 bytes: a site's bytes as the healing agent reads them
POLLFD = 0x128  # struct pollfd {fd, events, revents} of the armed agent
HEAL_REPORTED = 0x130  # u64: HEAL_BATCHES when an attach last reported them
FLAGS_PAGE = 0x138  # u64: the page of session flags the tracers use (trampolines/tracer.py), 0: none yet
OLD_ACTION = 0x140  # struct k_sigaction {handler, flags, restorer, mask}: before us
DEFAULT_ACTION = 0x160  # a zeroed k_sigaction (SIG_DFL), for re-raising
#: What handler copy k chains to: OLD_ACTION (before our install) for copy 0, then
#: each program handler installed after ours, in front of which copy k was put.
OLD_ACTIONS = (OLD_ACTION, 0x180, 0x1A0, 0x1C0)
HANDLER_COPIES = len(OLD_ACTIONS)
#: The thread borrowed at install, as its stop found it (the thread-ABI check of a later
#: capture reads these instead of stopping a thread, trampolines/tracer.py): its tid (0:
#: nothing recorded; written last), rseq signature, thread pointer (fs_base), rseq area,
#: and ABI_RSEQ_KNOWN (1: the kernel told the rseq configuration).
ABI_TID = 0x1E0  # u32
ABI_RSEQ_SIG = 0x1E4  # u32
ABI_FS_BASE = 0x1E8  # u64
ABI_RSEQ_AREA = 0x1F0  # u64
ABI_RSEQ_KNOWN = 0x1F8  # u32
SCRATCH = 0x200  # strings and structs passed to agent syscalls
SCRATCH_SIZE = 0x900
_FSTAT = SCRATCH + 0x400  # struct stat of a tool's fstat request
_SCHED = SCRATCH + 0x500  # struct sched_attr of tune_agent
AGENT_STAT = 0xB00  # struct stat (144 bytes) the agent fills on its own (fstat of its descriptors)
#: u64: the target address of the fix ledger (poke/fixes.py: hot-fixes in force), 0: none yet.
HDR_FIXES = 0xBF8
RELEASED = 0xC00  # released shared regions, for reuse (Resident.release_shared): RELEASED_SLOTS records
RELEASED_SLOTS = 16
RELEASED_RECORD = 64
SHARED_MODE = 0o600  # every memfd of ours
TABLE_OFFSET = 0x1000

# HDR_PREPARED bits.
PREPARED_MEMBARRIER = 1  # membarrier SYNC_CORE registered (for the life of the process image)
PREPARED_AGENT_SLICE = 2  # the agent asked for a short scheduler slice (Resident.tune_agent)
#: The agent's scheduler slice (EEVDF custom slice, Linux 6.12; ignored before): woken by a
#: request, it runs at once instead of after the busy threads' slices (each sync waits for it).
AGENT_SLICE_NS = 100_000
_SCHED_ATTR = "<IIQiIQQQII"  # struct sched_attr, SCHED_ATTR_SIZE_VER1 (56 bytes)
_FAIR_POLICIES = (0, 3)  # SCHED_OTHER, SCHED_BATCH

# WATCH_STATE values. A thread held at the gate (_emit_gate) goes on only in IDLE or HEALED.
WATCH_IDLE = 0  # no batch in flight
WATCH_ARMED = 1  # a batch has (or may get) int3s in place; the agent watches the tool
WATCH_HEALING = 2  # the tool died; the agent finishes the batch (it took ARMED with cmpxchg)
WATCH_HEALED = 3  # the agent finished it (HEAL_* say what); the next tool finds the text whole
WATCH_TAKEN = 4  # a later tool finishes it (the agent could not tell the tool died)
HEAL_POLL_NS = 1_000_000  # the armed agent looks at the tool every millisecond (and after each request)
POLLIN = 1

# -- ucontext/siginfo offsets (x86-64) ----------------------------------------
SIGINFO_CODE = 8
UC_RSP = 40 + 15 * 8  # uc_mcontext.gregs[REG_RSP]
UC_RIP = 40 + 16 * 8  # uc_mcontext.gregs[REG_RIP]

#: Room for 196,608 distinct sites per process (3/4 of the slots): a batch of 100,000 and more.
DEFAULT_CAPACITY = 1 << 18
CODE_SIZE = PAGE
AGENT_STACK = 64 * 1024
SIG_IGN = 1
_SIGSET_SIZE = 8
#: sa_flags of every handler copy we install (SA_NODEFER: see the not-ours path of _emit_handler).
HANDLER_FLAGS = sc.SA_SIGINFO | sc.SA_RESTORER | sc.SA_RESTART | sc.SA_NODEFER


def ledger_offset(capacity: int) -> int:
    """Offset of the ledger (poke/ledger.py) in the control region: right after the table."""
    return TABLE_OFFSET + SiteTable.size_for(capacity)


def ctl_size(capacity: int) -> int:
    size = ledger_offset(capacity) + Ledger.size_for(capacity)
    return (size + PAGE - 1) & ~(PAGE - 1)


@dataclass(frozen=True)
class ResidentStats:
    emulated: int
    not_ours: int
    syncs: int
    requests: int


@dataclass(frozen=True)
class AgentHeal:
    """Batches the agent finished because their tool died (since the last attach looked)."""

    tool_pid: int  # the (last) tool that died
    sites: int  # sites its batch had in flight, now whole
    batches: int
    failed_writes: int  # writes that failed (a site unmapped meanwhile)


@dataclass(frozen=True)
class SharedRegion:
    """A memfd mapped at ``address`` in the target and at ``local`` in the tool;
    its data part (after the code) at ``data_address`` in the target."""

    address: int
    size: int
    local: mmap.mmap
    data_address: int
    #: Its record in the control region's list of reusable regions (map_shared(reuse=True)), else -1.
    slot: int = -1
    #: It was mapped by an earlier session and given back (release_shared): its code
    #: pages may still be named by a thread's rseq_cs; write them with write_code.
    reused: bool = False


# Records of RELEASED: regions a session gave back for a later one (map_shared(reuse=True)).
_REC_STATE, _REC_FD, _REC_ADDRESS, _REC_CODE, _REC_DATA, _REC_DATA_ADDRESS, _REC_INODE, _REC_APART = (
    0, 4, 8, 16, 24, 32, 40, 48)
_FREE, _RELEASED, _IN_USE = 0, 1, 2
#: rseq_cs descriptors are 32-byte aligned; post_commit_offset is their third word.
_RSEQ_CS_ALIGN, _RSEQ_POST_COMMIT = 32, 16


# ---------------------------------------------------------------------------
# Code generation
# ---------------------------------------------------------------------------


def handler_label(copy: int) -> str:
    """Label of handler copy ``copy`` (copy 0 is the one an install gives SIGTRAP)."""
    return "handler" if copy == 0 else f"handler_{copy}"


def _emit_handler(a: Asm, *, ctl: int, capacity: int, copy: int = 0) -> None:
    """The SIGTRAP handler: ``handle_int3`` (poke/spec.py) in machine code.

    rdi = signo, rsi = siginfo, rdx = ucontext.  It may clobber every register
    but rsp: rt_sigreturn (our restorer) reloads them all from the ucontext.
    Pairs with SiteTable.publish: an entry's addr is stored after its insn, so
    finding addr here means insn is whole.

    ``copy``: the copies differ only in the saved disposition their not-ours
    path chains to (``OLD_ACTIONS[copy]``). When the program installs its own
    handler after ours, a fresh copy is put in front of it (safety.ensure_handler)
    while the program's handler keeps chaining to the copy it replaced, so the
    chain never loops back on itself.
    """
    table = ctl + TABLE_OFFSET
    bits = capacity.bit_length() - 1
    suffix = "" if copy == 0 else f"_{copy}"
    a.label(handler_label(copy))
    # Only an int3 executed in user mode (si_code SI_KERNEL) can be ours.
    a.op("CMP_RM32_IMM32", mem(R.RSI, SIGINFO_CODE), sc.SI_KERNEL)
    a.jump("JNE_REL32_64", "not_ours" + suffix)
    a.op("MOV_R64_RM64", R.R8, mem(R.RDX, UC_RIP))
    a.op("DEC_RM64", R.R8)  # r8 = site (ip is one past the int3)
    # rcx = table_slot(site): Fibonacci hash, the same as poke/table.py.
    a.op("MOV_R64_IMM64", R.RAX, Imm64(HASH_MULTIPLIER))
    a.op("MOV_R64_RM64", R.RCX, R.R8)
    a.op("IMUL_R64_RM64", R.RCX, R.RAX)
    a.op("SHR_RM64_IMM8", R.RCX, 64 - bits)
    a.op("LEA_R64_M", R.R10, mem(R.RIP, table))
    a.label("probe" + suffix)
    a.op("MOV_R64_RM64", R.R11, R.RCX)
    a.op("SHL_RM64_IMM8", R.R11, 4)
    a.op("MOV_R64_RM64", R.RAX, mem(R.R10, index=R.R11))
    a.op("CMP_RM64_R64", R.RAX, R.R8)
    a.jump("JE_REL32_64", "found" + suffix)
    a.op("TEST_RM64_R64", R.RAX, R.RAX)
    a.jump("JE_REL32_64", "not_ours" + suffix)  # an empty slot ends the probe
    a.op("INC_RM64", R.RCX)
    a.op("AND_RM64_IMM32", R.RCX, capacity - 1)
    a.jump("JMP_REL32_64", "probe" + suffix)

    a.label("found" + suffix)
    a.op("MOV_R64_RM64", R.R9, mem(R.R10, 8, index=R.R11))  # the new instruction
    a.op("LEA_R64_M", R.RCX, mem(R.R8, CALL_SIZE))  # site + 5
    a.op("MOV_R64_RM64", R.RAX, R.R9)
    a.op("SHR_RM64_IMM8", R.RAX, 8)
    a.op("MOVSXD_R64_RM32", R.RAX, R.EAX)
    a.op("ADD_RM64_R64", R.RAX, R.RCX)  # rel32 target = site + 5 + disp
    a.op("CMP_RM8_IMM8", R.R9L, CALL_OPCODE)
    a.jump("JE_REL32_64", "emulate_call" + suffix)
    a.op("CMP_RM8_IMM8", R.R9L, JMP_OPCODE)
    a.jump("JE_REL32_64", "emulate_jmp" + suffix)
    # nop5: continue after the site.
    a.op("MOV_RM64_R64", mem(R.RDX, UC_RIP), R.RCX)
    a.jump("JMP_REL32_64", "emulated" + suffix)
    a.label("emulate_jmp" + suffix)
    a.op("MOV_RM64_R64", mem(R.RDX, UC_RIP), R.RAX)
    a.jump("JMP_REL32_64", "emulated" + suffix)
    a.label("emulate_call" + suffix)
    # emulate_push(site + 5): the kernel built our frame below the 128-byte
    # red zone, so the word below the interrupted rsp is free to take.
    a.op("MOV_R64_RM64", R.R11, mem(R.RDX, UC_RSP))
    a.op("SUB_RM64_IMM8", R.R11, 8)
    a.op("MOV_RM64_R64", mem(R.R11), R.RCX)
    a.op("MOV_RM64_R64", mem(R.RDX, UC_RSP), R.R11)
    a.op("MOV_RM64_R64", mem(R.RDX, UC_RIP), R.RAX)
    a.label("emulated" + suffix)
    a.op("LEA_R64_M", R.RAX, mem(R.RIP, ctl + STAT_EMULATED))
    a.op("INC_RM64", mem(R.RAX), lock=True)
    a.op("RETNQ")

    a.label("not_ours" + suffix)
    # Not an in-flight site: whatever handled SIGTRAP before us handles it.
    a.op("LEA_R64_M", R.RAX, mem(R.RIP, ctl))
    a.op("INC_RM64", mem(R.RAX, STAT_NOT_OURS), lock=True)
    # We run with SA_NODEFER (HANDLER_FLAGS): a thread emulating a site does not block
    # SIGTRAP, so a batch's guard never takes it for a thread that does. What is not
    # ours runs as without the flag: SIGTRAP blocked (the program's handler expects
    # it; the re-raise below is delivered on return). rt_sigprocmask(SIG_BLOCK,
    # {SIGTRAP}, NULL, 8), with rdi/rsi/rdx kept for the program's handler.
    a.op("PUSH_R64", R.RDI)
    a.op("PUSH_R64", R.RSI)
    a.op("PUSH_R64", R.RDX)
    a.op("PUSHQ_IMM32", 1 << (sc.SIGTRAP - 1))
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_rt_sigprocmask)
    a.op("MOV_R32_IMM32", R.EDI, sc.SIG_BLOCK)
    a.op("MOV_R64_RM64", R.RSI, R.RSP)
    a.op("XOR_R32_RM32", R.EDX, R.EDX)
    a.op("MOV_R32_IMM32", R.R10D, _SIGSET_SIZE)
    a.op("SYSCALL")
    a.op("POP_R64", R.RAX)
    a.op("POP_R64", R.RDX)
    a.op("POP_R64", R.RSI)
    a.op("POP_R64", R.RDI)
    a.op("LEA_R64_M", R.RAX, mem(R.RIP, ctl))
    a.op("MOV_R64_RM64", R.RAX, mem(R.RAX, OLD_ACTIONS[copy]))
    a.op("CMP_RM64_IMM8", R.RAX, SIG_IGN)
    a.jump("JE_REL32_64", "return" + suffix)
    a.op("TEST_RM64_R64", R.RAX, R.RAX)
    a.jump("JE_REL32_64", "default_action" + suffix)
    a.op("JMP_RM64", R.RAX)  # the program's handler, same (sig, info, uc)
    a.label("return" + suffix)
    a.op("RETNQ")
    a.label("default_action" + suffix)
    # SIG_DFL: put the default back and re-raise; SIGTRAP is blocked now (above),
    # so it is delivered on return and the program dies as it would have.
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_rt_sigaction)
    a.op("MOV_R32_IMM32", R.EDI, sc.SIGTRAP)
    a.op("LEA_R64_M", R.RSI, mem(R.RIP, ctl + DEFAULT_ACTION))
    a.op("XOR_R32_RM32", R.EDX, R.EDX)
    a.op("MOV_R32_IMM32", R.R10D, _SIGSET_SIZE)
    a.op("SYSCALL")
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_gettid)
    a.op("SYSCALL")
    a.op("MOV_R32_RM32", R.EBX, R.EAX)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_getpid)
    a.op("SYSCALL")
    a.op("MOV_R32_RM32", R.EDI, R.EAX)
    a.op("MOV_R32_RM32", R.ESI, R.EBX)
    a.op("MOV_R32_IMM32", R.EDX, sc.SIGTRAP)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_tgkill)
    a.op("SYSCALL")
    a.op("RETNQ")


def _emit_restorer(a: Asm) -> None:
    """sa_restorer of every copy: rt_sigreturn reloads the (edited) ucontext."""
    a.label("restorer")
    a.op("MOV_R32_IMM32", R.EAX, 15)  # rt_sigreturn
    a.op("SYSCALL")


def _emit_agent(a: Asm, *, ctl: int, capacity: int) -> None:
    """The sync agent: a thread that serves the mailbox forever.

    Pairs with :meth:`Resident.syscall`: the tool writes nr/args, then bumps
    MBX_REQUEST and wakes it; the agent runs the syscall, stores the result,
    then sets MBX_DONE to the request number and wakes the tool.

    While WATCH_STATE is ARMED (a batch of the tool's may have int3s in place)
    it sleeps at most HEAL_POLL_TS and, before each sleep, polls the tool's
    pidfd: readable means every thread of the tool has exited (no write of
    its can still land). Then it takes the batch (cmpxchg ARMED -> HEALING,
    so a later tool that took it first wins) and finishes it (_emit_heal).
    """
    a.label("agent")
    a.op("LEA_R64_M", R.R12, mem(R.RIP, ctl))
    # Every signal blocked: a signal for the program never runs on our thread.
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_rt_sigprocmask)
    a.op("MOV_R32_IMM32", R.EDI, sc.SIG_SETMASK)
    a.op("LEA_R64_M", R.RSI, mem(R.R12, HDR_ALL_SIGNALS))
    a.op("XOR_R32_RM32", R.EDX, R.EDX)
    a.op("MOV_R32_IMM32", R.R10D, _SIGSET_SIZE)
    a.op("SYSCALL")
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_gettid)
    a.op("SYSCALL")
    a.op("MOV_RM32_R32", mem(R.R12, HDR_AGENT_TID), R.EAX)

    a.label("agent_loop")
    a.op("MOV_R32_RM32", R.EAX, mem(R.R12, MBX_REQUEST))
    a.op("CMP_R32_RM32", R.EAX, mem(R.R12, MBX_DONE))
    a.jump("JNE_REL32_64", "agent_work")
    a.op("MOV_R32_RM32", R.EBX, R.EAX)  # the request number seen, for the futex wait
    a.op("XOR_R32_RM32", R.R10D, R.R10D)  # no timeout unless armed
    a.op("CMP_RM32_IMM8", mem(R.R12, WATCH_STATE), WATCH_ARMED)
    a.jump("JNE_REL32_64", "agent_wait")
    # Armed: has the tool exited? poll(&pollfd, 1, 0)
    a.op("MOV_R32_RM32", R.ECX, mem(R.R12, WATCH_PIDFD))
    a.op("MOV_RM32_R32", mem(R.R12, POLLFD), R.ECX)
    a.op("MOV_RM32_IMM32", mem(R.R12, POLLFD + 4), POLLIN)  # events = POLLIN, revents = 0
    a.op("LEA_R64_M", R.RDI, mem(R.R12, POLLFD))
    a.op("MOV_R32_IMM32", R.ESI, 1)
    a.op("XOR_R32_RM32", R.EDX, R.EDX)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_poll)
    a.op("SYSCALL")
    a.op("LEA_R64_M", R.R10, mem(R.R12, HEAL_POLL_TS))  # from here on: a timed sleep
    a.op("CMP_RM64_IMM8", R.RAX, 1)
    a.jump("JNE_REL32_64", "agent_wait")
    a.op("TEST_RM16_IMM16", mem(R.R12, POLLFD + 6), POLLIN)
    a.jump("JE_REL32_64", "agent_wait")  # POLLNVAL etc.: not a sign of death
    # The descriptor is still the pidfd we opened (the program may have reused the number).
    a.op("MOV_R32_RM32", R.EDI, mem(R.R12, WATCH_PIDFD))
    a.op("LEA_R64_M", R.RSI, mem(R.R12, AGENT_STAT))
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_fstat)
    a.op("SYSCALL")
    a.op("LEA_R64_M", R.R10, mem(R.R12, HEAL_POLL_TS))
    a.op("TEST_RM64_R64", R.RAX, R.RAX)
    a.jump("JNE_REL32_64", "agent_wait")
    a.op("MOV_R64_RM64", R.RAX, mem(R.R12, AGENT_STAT + sc.STAT_INO))
    a.op("CMP_R64_RM64", R.RAX, mem(R.R12, WATCH_PIDFD_INO))
    a.jump("JNE_REL32_64", "agent_wait")
    # The tool is gone: take its batch.
    a.op("MOV_R32_IMM32", R.EAX, WATCH_ARMED)
    a.op("MOV_R32_IMM32", R.ECX, WATCH_HEALING)
    a.op("CMPXCHG_RM32_R32", mem(R.R12, WATCH_STATE), R.ECX, lock=True)
    a.jump("JNE_REL32_64", "agent_loop")
    a.jump("JMP_REL32_64", "heal")

    a.label("agent_wait")
    # futex_wait(&request, seen value, r10): sleeps unless a request came meanwhile.
    a.op("MOV_R32_RM32", R.EDX, R.EBX)
    a.op("LEA_R64_M", R.RDI, mem(R.R12, MBX_REQUEST))
    a.op("XOR_R32_RM32", R.ESI, R.ESI)  # FUTEX_WAIT, shared: the tool maps it too
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_futex)
    a.op("SYSCALL")
    a.jump("JMP_REL32_64", "agent_loop")

    a.label("agent_work")
    a.op("MOV_R32_RM32", R.R13D, mem(R.R12, MBX_REQUEST))
    a.op("MOV_R64_RM64", R.RAX, mem(R.R12, MBX_NR))
    a.op("MOV_R64_RM64", R.RDI, mem(R.R12, MBX_ARGS + 0))
    a.op("MOV_R64_RM64", R.RSI, mem(R.R12, MBX_ARGS + 8))
    a.op("MOV_R64_RM64", R.RDX, mem(R.R12, MBX_ARGS + 16))
    a.op("MOV_R64_RM64", R.R10, mem(R.R12, MBX_ARGS + 24))
    a.op("MOV_R64_RM64", R.R8, mem(R.R12, MBX_ARGS + 32))
    a.op("MOV_R64_RM64", R.R9, mem(R.R12, MBX_ARGS + 40))
    a.op("SYSCALL")
    a.op("MOV_RM64_R64", mem(R.R12, MBX_RESULT), R.RAX)
    a.op("CMP_RM64_IMM32", mem(R.R12, MBX_NR), sc.SYS_membarrier)
    a.jump("JNE_REL32_64", "agent_counted")
    a.op("INC_RM64", mem(R.R12, STAT_SYNCS), lock=True)
    a.label("agent_counted")
    a.op("INC_RM64", mem(R.R12, STAT_REQUESTS), lock=True)
    a.op("MOV_RM32_R32", mem(R.R12, MBX_DONE), R.R13D)
    a.op("LEA_R64_M", R.RDI, mem(R.R12, MBX_DONE))
    a.op("MOV_R32_IMM32", R.ESI, _ptrace.FUTEX_WAKE)
    a.op("MOV_R32_IMM32", R.EDX, 0x7FFF_FFFF)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_futex)
    a.op("SYSCALL")
    a.jump("JMP_REL32_64", "agent_loop")
    _emit_heal(a, capacity=capacity)


def _emit_heal(a: Asm, *, capacity: int) -> None:
    """The agent finishes the batch of a tool that died (r12 = control region).

    The rule of recovery (poke/recover.py), in machine code: a table entry
    whose site starts with an int3 is in flight, and what threads execute
    there is the entry. Text is read and written through MEM_FD
    (/proc/self/mem: it bypasses page protection as the tool's writes do, and
    an address unmapped meanwhile fails the call instead of faulting).

    0. MEM_FD must still be the file it was (st_ino), else nothing is written
       and the state becomes TAKEN: the next tool finishes the batch;
    pass 0: count the in-flight sites; none: done, no sync;
       sync (the tool may have died before its int3 sync);
    pass 1: each in-flight site gets its entry's bytes 1..4; sync;
    pass 2: each in-flight site gets its entry's byte 0; sync;
    then HEAL_* record what was done, WATCH_STATE = HEALED, and every thread
    waiting at the gate is woken. :func:`heal_model` is the same rule in Python.
    """
    a.label("heal")
    a.op("MOV_R32_RM32", R.EDI, mem(R.R12, MEM_FD))
    a.op("LEA_R64_M", R.RSI, mem(R.R12, AGENT_STAT))
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_fstat)
    a.op("SYSCALL")
    a.op("XOR_R32_RM32", R.R14D, R.R14D)  # sites in flight
    a.op("TEST_RM64_R64", R.RAX, R.RAX)
    a.jump("JNE_REL32_64", "heal_refused")
    a.op("MOV_R64_RM64", R.RAX, mem(R.R12, AGENT_STAT + sc.STAT_INO))
    a.op("CMP_R64_RM64", R.RAX, mem(R.R12, MEM_INO))
    a.jump("JNE_REL32_64", "heal_refused")
    a.op("XOR_R32_RM32", R.R13D, R.R13D)  # the pass
    a.label("heal_pass")
    a.op("XOR_R32_RM32", R.R15D, R.R15D)  # the slot
    a.label("heal_slot")
    a.op("MOV_R64_RM64", R.RBX, R.R15)
    a.op("SHL_RM64_IMM8", R.RBX, 4)
    a.op("LEA_R64_M", R.RBX, mem(R.R12, TABLE_OFFSET, index=R.RBX))  # the entry
    a.op("MOV_R64_RM64", R.R8, mem(R.RBX))  # its site
    a.op("TEST_RM64_R64", R.R8, R.R8)
    a.jump("JE_REL32_64", "heal_next")
    # pread64(MEM_FD, HEAL_BUF, 5, site)
    a.op("MOV_R32_RM32", R.EDI, mem(R.R12, MEM_FD))
    a.op("LEA_R64_M", R.RSI, mem(R.R12, HEAL_BUF))
    a.op("MOV_R32_IMM32", R.EDX, CALL_SIZE)
    a.op("MOV_R64_RM64", R.R10, R.R8)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_pread64)
    a.op("SYSCALL")
    a.op("CMP_RM64_IMM8", R.RAX, CALL_SIZE)
    a.jump("JNE_REL32_64", "heal_next")  # unmapped: nothing to finish there
    a.op("CMP_RM8_IMM8", mem(R.R12, HEAL_BUF), INT3_BYTE)
    a.jump("JNE_REL32_64", "heal_next")  # whole: not in flight
    a.op("CMP_RM32_IMM8", R.R13D, 1)
    a.jump("JE_REL32_64", "heal_tail")
    a.op("CMP_RM32_IMM8", R.R13D, 2)
    a.jump("JE_REL32_64", "heal_head")
    a.op("INC_RM64", R.R14)
    a.jump("JMP_REL32_64", "heal_next")
    a.label("heal_tail")  # pwrite64(MEM_FD, &entry.insn[1], 4, site + 1)
    a.op("LEA_R64_M", R.RSI, mem(R.RBX, 9))
    a.op("MOV_R32_IMM32", R.EDX, CALL_SIZE - 1)
    a.op("LEA_R64_M", R.R10, mem(R.R8, 1))
    a.jump("JMP_REL32_64", "heal_write")
    a.label("heal_head")  # pwrite64(MEM_FD, &entry.insn[0], 1, site)
    a.op("LEA_R64_M", R.RSI, mem(R.RBX, 8))
    a.op("MOV_R32_IMM32", R.EDX, 1)
    a.op("MOV_R64_RM64", R.R10, R.R8)
    a.label("heal_write")
    a.op("MOV_R32_RM32", R.EDI, mem(R.R12, MEM_FD))
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_pwrite64)
    a.op("MOV_R64_RM64", R.RBP, R.RDX)
    a.op("SYSCALL")
    a.op("CMP_R64_RM64", R.RAX, R.RBP)
    a.jump("JE_REL32_64", "heal_next")
    a.op("INC_RM32", mem(R.R12, HEAL_FAILED))
    a.label("heal_next")
    a.op("INC_RM64", R.R15)
    a.op("CMP_RM64_IMM32", R.R15, capacity)
    a.jump("JB_REL32_64", "heal_slot")
    a.op("TEST_RM64_R64", R.R14, R.R14)
    a.jump("JE_REL32_64", "heal_done")
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_membarrier)
    a.op("MOV_R32_IMM32", R.EDI, sc.MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)
    a.op("XOR_R32_RM32", R.ESI, R.ESI)
    a.op("XOR_R32_RM32", R.EDX, R.EDX)
    a.op("SYSCALL")
    a.op("INC_RM64", mem(R.R12, STAT_SYNCS), lock=True)
    a.op("INC_RM32", R.R13D)
    a.op("CMP_RM32_IMM8", R.R13D, 3)
    a.jump("JB_REL32_64", "heal_pass")
    a.label("heal_done")
    a.op("INC_RM64", mem(R.R12, HEAL_BATCHES))
    a.op("MOV_RM64_R64", mem(R.R12, HEAL_SITES), R.R14)
    a.op("MOV_R32_RM32", R.EAX, mem(R.R12, WATCH_PID))
    a.op("MOV_RM32_R32", mem(R.R12, HEAL_PID), R.EAX)
    a.op("MOV_RM32_IMM32", mem(R.R12, WATCH_STATE), WATCH_HEALED)  # last: the text is whole
    a.op("LEA_R64_M", R.RDI, mem(R.R12, WATCH_STATE))
    a.op("MOV_R32_IMM32", R.ESI, _ptrace.FUTEX_WAKE)
    a.op("MOV_R32_IMM32", R.EDX, 0x7FFF_FFFF)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_futex)
    a.op("SYSCALL")
    a.jump("JMP_REL32_64", "agent_loop")
    a.label("heal_refused")
    # MEM_FD is not our file any more: nothing written; the next tool finishes the
    # batch (TAKEN keeps the gate closed until it has).
    a.op("MOV_RM32_IMM32", mem(R.R12, WATCH_STATE), WATCH_TAKEN)
    a.jump("JMP_REL32_64", "agent_loop")


def _emit_gate(a: Asm, *, ctl: int) -> None:
    """Where a held thread resumes if the tool dies while holding it (poke/guard.py).

    The tool points the held thread here, with rsp at a restore frame of its
    own state (target/sigframe.py), before any int3 of the batch is written;
    a tool that lives puts its registers back instead. So a thread that blocks
    SIGTRAP, released by the kernel when its tracer dies, waits here while
    WATCH_STATE says a batch may have int3s in place, and then returns to
    itself through rt_sigreturn. No push, no call: rsp points into the frame.
    """
    a.label("gate")
    a.op("LEA_R64_M", R.RDI, mem(R.RIP, ctl + WATCH_STATE))
    a.label("gate_loop")
    a.op("MOV_R32_RM32", R.EDX, mem(R.RDI))
    a.op("CMP_RM32_IMM8", R.EDX, WATCH_IDLE)
    a.jump("JE_REL32_64", "gate_open")
    a.op("CMP_RM32_IMM8", R.EDX, WATCH_HEALED)
    a.jump("JE_REL32_64", "gate_open")
    a.op("XOR_R32_RM32", R.ESI, R.ESI)  # FUTEX_WAIT while the state is still edx
    a.op("XOR_R32_RM32", R.R10D, R.R10D)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_futex)
    a.op("SYSCALL")
    a.jump("JMP_REL32_64", "gate_loop")
    a.label("gate_open")
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_rt_sigreturn)
    a.op("SYSCALL")


def heal_model(entries: dict[int, bytes], text: dict[int, bytes]) -> tuple[dict[int, bytes], int]:
    """What :func:`_emit_heal` does, in Python (the differential test runs both).

    ``entries``: site -> table instruction; ``text``: site -> its 5 bytes now
    (missing: unmapped). Returns the text afterwards and the number of sites
    that were in flight (an int3 on their first byte): each now holds its entry."""
    after = dict(text)
    healed = 0
    for site, insn in entries.items():
        now = text.get(site)
        if now is not None and now[0] == INT3_BYTE:
            after[site] = insn
            healed += 1
    return after, healed


@functools.cache
def generate_code(*, capacity: int) -> tuple[bytes, dict[str, int]]:
    """The resident code, position-independent: (bytes, label offsets).

    It addresses the control region rip-relatively (the region follows the
    code at CODE_SIZE in the same memfd), so it is generated once, before any
    thread is stopped, and copied to wherever the target maps it."""
    a = Asm()
    for copy in range(HANDLER_COPIES):
        _emit_handler(a, ctl=CODE_SIZE, capacity=capacity, copy=copy)
    _emit_restorer(a)
    _emit_gate(a, ctl=CODE_SIZE)
    _emit_agent(a, ctl=CODE_SIZE, capacity=capacity)
    blob, labels = a.assemble(0)
    if len(blob) > CODE_SIZE:
        raise InjectionError(f"resident code is {len(blob)} bytes, more than {CODE_SIZE}")
    return blob, labels


# The install stub: two pages mapped in the target by the borrowed thread, its
# code, then a mailbox page the new thread makes writable and posts to.
STUB_PAGES = 2
MB_STATUS = 0x00  # u32: 0 running, 1 done, 2 failed (written last)
MB_STEP = 0x04  # u32: the step that failed
MB_RESULT = 0x08  # i64: its -errno
MB_BASE = 0x10  # u64: where the region is mapped
MB_FD = 0x18  # u64: the target's descriptor of the memfd
_MB_DONE, _MB_FAILED = 1, 2
_INSTALL_STEPS = ("mprotect of the mailbox", "memfd_create", "ftruncate", "mmap", "mprotect")
_NAME_OFFSET = PAGE - 64  # the memfd's name and the thread's sit at the stub page's end
_THREAD_NAME_OFFSET = _NAME_OFFSET + 32


def _syscall_step(a: Asm, step: int) -> None:
    """``syscall``, then leave for ``fail`` with r14d = step if it returned -errno."""
    a.op("MOV_R32_IMM32", R.R14D, step)
    a.op("SYSCALL")
    a.op("CMP_RM64_IMM32", R.RAX, -4095)
    a.jump("JAE_REL32_64", "fail")


@functools.cache
def _install_stub(*, size: int, agent_offset: int, capacity: int) -> bytes:
    """The code that starts the agent thread, run from the stub pages.

    Position-independent (rip-, r13- and r15-relative), so it is made before
    any thread stops and copied to wherever the stub pages land.  Offset 0 is
    the ``syscall`` the borrowed thread runs as clone, with every signal
    blocked (BorrowedThread.syscall_at); the tool restores the thread at that
    syscall's exit, so the parent path below (rt_sigreturn on the thread's
    restore frame) only runs if the tool died meanwhile.  The child, the
    agent-to-be, works on its own, after the borrowed thread is released:

    1. name itself AGENT_NAME (so an attach that finds it before it posts
       knows it for ours) and make the mailbox page RW;
    2. memfd_create, ftruncate, mmap it RW shared (-> r13), mprotect the code page RX;
    3. record in the region's header where it came from (HDR_INSTALL_*:
       stub, descriptor, tid, capacity; the install magic last), so that an
       attach after a tool died here can finish the install (Resident.attach);
    4. post base and descriptor to the mailbox, status last (pairs with _await_stub);
    5. sleep on HDR_READY until the tool has written code and header (pairs
       with _finish_install's ready store + wake), switch to the region's
       stack and jump to the agent loop.
    On a failed step: post the step and -errno (if the mailbox is writable),
    undo the mapping and the descriptor, and exit the thread.
    """
    ctl = CODE_SIZE
    mailbox = PAGE
    a = Asm()
    a.op("SYSCALL")  # clone: rax = 0 in the child, its tid in the parent
    a.op("TEST_RM64_R64", R.RAX, R.RAX)
    a.jump("JE_REL32_64", "child")
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_rt_sigreturn)  # orphaned parent: back to its own state
    a.op("SYSCALL")
    a.label("child")
    a.op("MOV_RM64_IMM32", R.R12, -1)
    a.op("XOR_R32_RM32", R.R13D, R.R13D)
    a.op("LEA_R64_M", R.R15, mem(R.RIP, 0))
    # Step 1.
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_prctl)
    a.op("MOV_R32_IMM32", R.EDI, sc.PR_SET_NAME)
    a.op("LEA_R64_M", R.RSI, mem(R.R15, _THREAD_NAME_OFFSET))
    a.op("SYSCALL")  # a name is a courtesy: its failure is not one
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_mprotect)
    a.op("LEA_R64_M", R.RDI, mem(R.R15, mailbox))
    a.op("MOV_R32_IMM32", R.ESI, PAGE)
    a.op("MOV_R32_IMM32", R.EDX, sc.PROT_READ | sc.PROT_WRITE)
    _syscall_step(a, 0)
    # Step 2.
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_memfd_create)
    a.op("LEA_R64_M", R.RDI, mem(R.R15, _NAME_OFFSET))
    a.op("MOV_R32_IMM32", R.ESI, sc.MFD_CLOEXEC)
    _syscall_step(a, 1)
    a.op("MOV_R64_RM64", R.R12, R.RAX)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_ftruncate)
    a.op("MOV_R64_RM64", R.RDI, R.R12)
    a.op("MOV_R64_IMM64", R.RSI, Imm64(size))
    _syscall_step(a, 2)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_mmap)
    a.op("XOR_R32_RM32", R.EDI, R.EDI)
    a.op("MOV_R64_IMM64", R.RSI, Imm64(size))
    a.op("MOV_R32_IMM32", R.EDX, sc.PROT_READ | sc.PROT_WRITE)
    a.op("MOV_R32_IMM32", R.R10D, sc.MAP_SHARED)
    a.op("MOV_R64_RM64", R.R8, R.R12)
    a.op("XOR_R32_RM32", R.R9D, R.R9D)
    _syscall_step(a, 3)
    a.op("MOV_R64_RM64", R.R13, R.RAX)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_mprotect)
    a.op("MOV_R64_RM64", R.RDI, R.R13)
    a.op("MOV_R32_IMM32", R.ESI, CODE_SIZE)
    a.op("MOV_R32_IMM32", R.EDX, sc.PROT_READ | sc.PROT_EXEC)
    _syscall_step(a, 4)
    # Step 3.
    a.op("MOV_RM64_R64", mem(R.R13, ctl + HDR_INSTALL_STUB), R.R15)
    a.op("MOV_RM32_R32", mem(R.R13, ctl + HDR_INSTALL_FD), R.R12D)
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_gettid)
    a.op("SYSCALL")
    a.op("MOV_RM32_R32", mem(R.R13, ctl + HDR_INSTALL_TID), R.EAX)
    a.op("MOV_R64_IMM64", R.RAX, Imm64(capacity))
    a.op("MOV_RM64_R64", mem(R.R13, ctl + HDR_TABLE_CAPACITY), R.RAX)
    a.op("MOV_R64_IMM64", R.RAX, Imm64(MAGIC))
    a.op("MOV_RM64_R64", mem(R.R13, ctl + HDR_INSTALL_MAGIC), R.RAX)
    # Step 4.
    a.op("MOV_RM64_R64", mem(R.R15, mailbox + MB_BASE), R.R13)
    a.op("MOV_RM64_R64", mem(R.R15, mailbox + MB_FD), R.R12)
    a.op("MOV_RM32_IMM32", mem(R.R15, mailbox + MB_STATUS), _MB_DONE)
    # Step 5.
    a.op("LEA_R64_M", R.RDI, mem(R.R13, ctl + HDR_READY))
    a.label("wait")
    a.op("CMP_RM32_IMM8", mem(R.RDI), 0)
    a.jump("JNE_REL32_64", "go")
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_futex)
    a.op("XOR_R32_RM32", R.ESI, R.ESI)  # FUTEX_WAIT while the word is 0
    a.op("XOR_R32_RM32", R.EDX, R.EDX)
    a.op("XOR_R32_RM32", R.R10D, R.R10D)
    a.op("SYSCALL")
    a.jump("JMP_REL32_64", "wait")
    a.label("go")
    a.op("LEA_R64_M", R.RSP, mem(R.R13, size - 64))
    a.op("LEA_R64_M", R.R11, mem(R.R13, agent_offset))
    a.op("JMP_RM64", R.R11)
    # A failed step: r14d names it, rax holds -errno.
    a.label("fail")
    a.op("TEST_RM32_R32", R.R14D, R.R14D)
    a.jump("JE_REL32_64", "undo")  # step 0: the mailbox is not writable
    a.op("MOV_RM32_R32", mem(R.R15, mailbox + MB_STEP), R.R14D)
    a.op("MOV_RM64_R64", mem(R.R15, mailbox + MB_RESULT), R.RAX)
    a.op("MOV_RM32_IMM32", mem(R.R15, mailbox + MB_STATUS), _MB_FAILED)
    a.label("undo")
    a.op("TEST_RM64_R64", R.R13, R.R13)
    a.jump("JE_REL32_64", "unmapped")
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_munmap)
    a.op("MOV_R64_RM64", R.RDI, R.R13)
    a.op("MOV_R64_IMM64", R.RSI, Imm64(size))
    a.op("SYSCALL")
    a.label("unmapped")
    a.op("TEST_RM64_R64", R.R12, R.R12)
    a.jump("JS_REL32_64", "closed")
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_close)
    a.op("MOV_R64_RM64", R.RDI, R.R12)
    a.op("SYSCALL")
    a.label("closed")
    a.op("MOV_R32_IMM32", R.EAX, sc.SYS_exit)  # this thread only
    a.op("XOR_R32_RM32", R.EDI, R.EDI)
    a.op("SYSCALL")
    code, _ = a.assemble(0)
    names = REGION_NAME.encode().ljust(32, b"\0") + AGENT_NAME.encode().ljust(16, b"\0")
    return code + bytes(_NAME_OFFSET - len(code)) + names


def _await_stub(process: Process, stub: int, timeout_s: float = 5.0) -> tuple[int, int]:
    """(descriptor, base) the new thread posts to the stub's mailbox; InjectionError
    naming the step if it failed (pairs with _install_stub's step 4)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.0
    while True:
        status, step, result, base, fd = struct.unpack("<IIqQQ", process.read(stub + PAGE, 32))
        if status == _MB_DONE:
            return fd, base
        if status == _MB_FAILED:
            raise InjectionError(f"installing textpoke in process {process.pid} failed at "
                                 f"{_INSTALL_STEPS[step]}: {os.strerror(-result)}")
        if time.monotonic() > deadline:
            if process.stopped():
                raise TargetStopped(f"process {process.pid} was stopped while textpoke started its agent")
            raise InjectionError(f"textpoke's new thread did not start in process {process.pid}")
        time.sleep(delay)
        delay = min(delay + 0.0001, 0.002)


def region_size(capacity: int) -> int:
    """Bytes of the resident memfd: code page, control region, agent stack."""
    return CODE_SIZE + ctl_size(capacity) + AGENT_STACK


# ---------------------------------------------------------------------------
# The resident part, seen from the tool
# ---------------------------------------------------------------------------


#: CPU time after which a running thread has surely left any trampoline routine
#: (200x a routine's longest path without a wait).
RAN_NS = 200_000


def _rec(slot: int) -> int:
    """Offset of record ``slot`` of the reusable regions in the control area."""
    return RELEASED + slot * RELEASED_RECORD


def _post_commit_words(offset: int, size: int) -> list[int]:
    """Offsets of the 8-byte words in [offset, offset + size) that would be the
    post_commit_offset of a 32-byte aligned rseq_cs descriptor."""
    first = offset - offset % _RSEQ_CS_ALIGN + _RSEQ_POST_COMMIT
    if first < offset:
        first += _RSEQ_CS_ALIGN
    return list(range(first, offset + size - 7, _RSEQ_CS_ALIGN))


def _without_post_commit(code: bytes, offset: int) -> bytes:
    out = bytearray(code)
    for at in _post_commit_words(offset, len(code)):
        out[at - offset : at - offset + 8] = bytes(8)
    return bytes(out)


def _zero_code(local: mmap.mmap, code_size: int) -> None:
    """Ready a reused region's code part for new code: every 32-byte aligned block's
    post_commit_offset word zeroed (8-byte stores), nothing else. Each descriptor an
    old rseq_cs may still name then matches no instruction and stays otherwise whole
    (start_ip, abort_ip, and the signature before abort_ip intact) until
    :meth:`Resident.write_code` rewrites it. Zeroing more was fatal on this machine's
    kernel: a thread whose stale rseq_cs named a cleared descriptor got SIGSEGV at its
    next preemption (seen when a killed session's region was reused). The old code
    stays in place meanwhile; nothing leads there (:meth:`Resident._unused`)."""
    words = memoryview(local).cast("Q")
    for at in _post_commit_words(0, code_size):
        words[at // 8] = 0
    del words


def _u64(buf: mmap.mmap, off: int) -> int:
    return struct.unpack_from("<Q", buf, off)[0]


def _u32(buf: mmap.mmap, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


def _open_shared(pid: int, path: str, size: int) -> tuple[int, mmap.mmap]:
    """Map the memfd behind ``path`` (a /proc link into the target) in the tool."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise TargetExited(f"process {pid} exited") from exc
    except OSError as exc:
        raise InjectionError(
            f"cannot open textpoke's shared memory in process {pid}: {exc.strerror}"
        ) from exc
    try:
        # memfds are created 0777; only the owner (and root) may open ours, even
        # through /proc, whatever the target's other permissions allow.
        os.fchmod(fd, SHARED_MODE)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        os.close(fd)
        raise InjectionError(f"cannot map textpoke's shared memory of process {pid}: {exc.strerror}") from exc


@dataclass(frozen=True)
class RegionInfo:
    """A resident region found in a process's maps (read, not locked)."""

    base: int  # its code page in the target
    inode: int
    fd: int  # the target's descriptor of its memfd, kept open (it may have been closed since)
    version: int  # 0: not a textpoke control region
    agent_tid: int
    #: Its agent is a thread of this process: installed here, not inherited
    #: through fork (a child has its parent's mappings but not its threads).
    owned: bool


def _syscall_line(pid: int, tid: int) -> str | None:
    """/proc/.../syscall of thread ``tid``: "running", "nr args.. sp pc" or "-1 sp pc"; None if gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            return f.read()
    except OSError:
        return None


def _pc_of(line: str | None) -> int | None:
    fields = line.split() if line else []
    if len(fields) not in (3, 9):
        return None  # "running", or gone
    return int(fields[-1], 16)


def thread_pc(pid: int, tid: int) -> int | None:
    """User-mode address where thread ``tid`` is stopped or blocked in a syscall
    (/proc/.../syscall: "nr args.. sp pc" or "-1 sp pc"); None if it runs or is gone."""
    return _pc_of(_syscall_line(pid, tid))


def pc_in(pc: int | None, *codes: range) -> bool:
    """Whether an address :func:`thread_pc` gave lies in one of ``codes``. None (a
    running thread's) lies nowhere; asked as ``None in range``, Python would walk the
    whole range to say so."""
    return pc is not None and any(pc in code for code in codes)


def _agent_here(process: Process, tid: int, code: int) -> bool:
    """Whether this region's agent (code at ``code``) is a thread of ``process``.

    The tid alone could be a reused number in a forked child, so a thread
    blocked in a syscall must also be blocked at our code. An agent that has
    not published its tid yet (it just started, or was stopped first) is
    found by where it is blocked. One read of /proc/.../syscall answers both
    questions: read twice, an agent that woke between the reads (an armed
    agent wakes every millisecond) looked blocked, then had no address, and
    its region went unseen (the next attach installed a second one)."""
    code_range = range(code, code + CODE_SIZE)
    if not tid:
        return any(pc_in(thread_pc(process.pid, t), code_range) for t in process.threads())
    line = _syscall_line(process.pid, tid)
    if line is None:
        return False
    return line.startswith("running") or pc_in(_pc_of(line), code_range)


def find_regions(process: Process) -> list[RegionInfo]:
    """Every resident region mapped in ``process``, lowest address first."""
    groups: dict[int, list] = {}
    for m in process.maps():
        if m.path.startswith(f"/memfd:{REGION_NAME} "):
            groups.setdefault(m.inode, []).append(m)
    regions = []
    for inode, mappings in groups.items():
        code = min(mappings, key=lambda m: m.start)
        # An agent that has not published its tid yet (just started, or just
        # continued after a stop) gets a moment to; one that never started
        # (an install killed before it) costs this moment on each attach.
        deadline = time.monotonic() + 0.1
        while True:
            header = _read_header(process, code.start)
            if header is None:
                break
            tid = _u32(header, HDR_AGENT_TID)
            owned = _agent_here(process, tid, code.start)
            if tid or owned or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        if header is None:
            continue
        regions.append(RegionInfo(base=code.start, inode=inode, fd=_u32(header, HDR_INSTALL_FD),
                                  version=_u32(header, HDR_VERSION), agent_tid=tid, owned=owned))
    return sorted(regions, key=lambda r: r.base)


@dataclass(frozen=True)
class UnfinishedInstall:
    """A region whose agent thread waits to be released by a tool that died."""

    base: int
    inode: int
    fd: int
    stub: int
    capacity: int
    tid: int


def our_threads(process: Process) -> frozenset[int]:
    """Threads named AGENT_NAME: agents, and install threads not yet released."""
    found = set()
    for tid in process.threads():
        try:
            with open(f"/proc/{process.pid}/task/{tid}/comm") as f:
                if f.read().strip() == AGENT_NAME:
                    found.add(tid)
        except OSError:
            continue
    return frozenset(found)


def find_unfinished(process: Process) -> list[UnfinishedInstall]:
    """Regions the install stub created in ``process`` (install magic set) whose
    agent never started (a tool died before releasing it): their new thread
    still waits in the stub."""
    found = []
    for m in process.maps():
        if not (m.path.startswith(f"/memfd:{REGION_NAME} ") and m.offset == 0):
            continue
        header = _read_ctl(process, m.start, HDR_INSTALL_MAGIC + 8)
        # The tool may have died writing the header (magic set, agent not yet
        # started): finishing again writes the same bytes.
        if header is None or _u64(header, HDR_INSTALL_MAGIC) != MAGIC:
            continue
        if _u32(header, HDR_AGENT_TID):
            continue
        stub, tid = _u64(header, HDR_INSTALL_STUB), _u32(header, HDR_INSTALL_TID)
        if not pc_in(thread_pc(process.pid, tid), range(stub, stub + PAGE)):
            continue  # not this process's thread (inherited through fork), or gone
        found.append(UnfinishedInstall(base=m.start, inode=m.inode, fd=_u32(header, HDR_INSTALL_FD), stub=stub,
                                       capacity=_u64(header, HDR_TABLE_CAPACITY), tid=tid))
    return found


#: A mask with every signal blocked, as our install thread is born with (the
#: kernel keeps SIGKILL and SIGSTOP out). glibc never lets a program block its
#: internal signals 32 and 33, so only glibc itself (for a moment, in fork or
#: pthread_create) or a new thread of ours has this mask.
_BORN_BLOCKED = 0xFFFF_FFFF_FFFF_FFFF & ~((1 << (signal.SIGKILL - 1)) | (1 << (signal.SIGSTOP - 1)))


def _being_born(process: Process) -> bool:
    """Whether a thread has every signal blocked: perhaps an install thread that
    has not named itself yet (a stopped process held it back at birth)."""
    return any(process.thread_signal_mask(tid) == _BORN_BLOCKED for tid in process.threads())


def wait_unfinished(process: Process, timeout_s: float = 2.0) -> list[UnfinishedInstall]:
    """find_unfinished, waiting for an install thread that has not posted yet
    (one a stopped process held back, say) rather than installing a second part."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = find_unfinished(process)
        if found or time.monotonic() > deadline or not (our_threads(process) or _being_born(process)):
            return found
        time.sleep(0.002)


def _read_ctl(process: Process, base: int, size: int) -> bytes | None:
    """The first ``size`` bytes of the control area of the region at ``base``
    (through /proc/PID/mem: no privilege beyond ptrace access); None if it
    is gone (unmapped meanwhile, or the process exited)."""
    try:
        return process.read(base + CODE_SIZE, size)
    except TargetError:
        return None


def _read_header(process: Process, base: int) -> bytes | None:
    """The header of the region at ``base``; None if it is gone or not ours."""
    header = _read_ctl(process, base, HDR_INSTALL_FD + 4)
    if header is None or _u64(header, HDR_MAGIC) != MAGIC:
        return None
    return header


def _region_path(process: Process, *, base: int, end: int, inode: int, fd: int) -> str:
    """A path that opens the memfd mapped at [base, end) of the target (``inode``).

    The target's descriptor ``fd`` (/proc/PID/fd: same-user ptrace access
    suffices; checked, since the program may have closed it and reused the
    number), else /proc/PID/map_files (root, or CAP_CHECKPOINT_RESTORE).
    The caller checks what it opened (:func:`_open_checked`)."""
    pid = process.pid
    for path in (f"/proc/{pid}/fd/{fd}", f"/proc/{pid}/map_files/{base:x}-{end:x}"):
        try:
            if os.stat(path).st_ino == inode:
                return path
        except OSError:
            continue
    raise InjectionError(
        f"cannot open textpoke's shared memory in process {pid}: the program closed textpoke's descriptor "
        "of it, and /proc/PID/map_files needs privileges",
        hint="attach as root (or with CAP_CHECKPOINT_RESTORE)",
    )


def _open_checked(pid: int, path: str, size: int, inode: int) -> mmap.mmap:
    """_open_shared, refusing a file that is not the memfd ``inode`` (a race
    with the program reusing a descriptor number)."""
    local_fd, local = _open_shared(pid, path, size)
    try:
        if os.fstat(local_fd).st_ino != inode:
            local.close()
            raise InjectionError(f"textpoke's memfd in process {pid} was replaced under it; nothing was written")
    finally:
        os.close(local_fd)
    return local


def _still_ours(pid: int, fd: int, inode: int) -> bool:
    """Whether descriptor ``fd`` of ``pid`` is still our memfd (the program may
    have closed it, with close_range say, and reused the number)."""
    try:
        return os.stat(f"/proc/{pid}/fd/{fd}").st_ino == inode
    except OSError:
        return False


def _take_lock(pid: int, path: str) -> int:
    """The session lock: flock on a descriptor of our own (not mmap's dup), so
    closing it releases the lock, and the kernel releases it if we die."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InjectionError(f"cannot open textpoke's state in process {pid}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise BusyError(f"another textpoke session is attached to process {pid}") from exc
        raise InjectionError(f"cannot lock textpoke's state in process {pid}: {exc.strerror}") from exc
    return fd


class Resident:
    """Handle on the resident part of one target; a context manager.

    :meth:`attach` adopts the resident part a previous session left (stopping
    nothing) or installs one (borrowing one thread, briefly).  Holding a
    Resident holds the session lock.
    """

    def __init__(self, process: Process, *, base: int, local: mmap.mmap, lock_fd: int, created: bool) -> None:
        self.process = process
        self.base = base  # where the memfd is mapped in the target (code first)
        self.local = local
        self.created = created
        self._lock_fd = lock_fd
        self.inode = os.fstat(lock_fd).st_ino  # of the memfd: which descriptor of the target is ours
        self.ctl = memoryview(local)[CODE_SIZE:]
        self.ctl_address = base + CODE_SIZE
        self.capacity = _u64(self.ctl, HDR_TABLE_CAPACITY)
        self.table = SiteTable(self.ctl[TABLE_OFFSET:], capacity=self.capacity,
                               populated=self._populated(CODE_SIZE + TABLE_OFFSET))
        self.labels = {name: base + off for name, off in generate_code(capacity=self.capacity)[1].items()}
        self.ledger = Ledger(self.ctl[ledger_offset(self.capacity) :], capacity=self.capacity,
                             populated=self._populated(CODE_SIZE + ledger_offset(self.capacity)))
        self._request_addr = _ptrace.buffer_address(local, CODE_SIZE + MBX_REQUEST)
        self._done_addr = _ptrace.buffer_address(local, CODE_SIZE + MBX_DONE)
        self.attach_stop_ns = 0
        self.attach_wait_ns = 0  # of attach_stop_ns: until the borrowed thread reached its stop
        self.held: BorrowedThread | None = None  # a spawned program's main thread, not yet released
        #: This attach finished an install a killed tool had left (its agent thread waiting).
        self.finished_install = False
        #: How long an agent request may take, or a stopped target stay stopped.
        self.timeout_s = 10.0
        self._watch: bool | None = None  # open_watch's answer, once asked

    def _populated(self, offset: int):  # -> Callable[[int, int], list[tuple[int, int]]]
        """Byte ranges of the memfd, relative to ``offset``, that hold pages (SEEK_DATA/SEEK_HOLE):
        what a table scan reads (SiteTable's ``populated``; the holes read as zeros, and a
        read of a hole through the mapping would allocate it in the target's region)."""
        fd = self._lock_fd

        def ranges(start: int, end: int) -> list[tuple[int, int]]:
            found = []
            at, stop = offset + start, offset + end
            try:
                while at < stop:
                    at = os.lseek(fd, at, os.SEEK_DATA)
                    hole = min(os.lseek(fd, at, os.SEEK_HOLE), stop)
                    if at >= stop:
                        break
                    found.append((at - offset, hole - offset))
                    at = hole
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after ``at``
                    return found
                return [(start, end)]  # a kernel without SEEK_DATA on shmem: read it all
            return found

        return ranges

    # -- creation ---------------------------------------------------------------
    @classmethod
    def attach(cls, process: Process, *, capacity: int = DEFAULT_CAPACITY, spawned: bool = False) -> Resident:
        """Adopt the resident part a previous session left, else install one.

        ``spawned``: the process comes from target.spawn (held at its entry
        point by us): install through its main thread, which stays stopped
        there as :attr:`held` until the caller releases it (Session.release)."""
        if spawned:
            held = BorrowedThread(process, process.pid, already_stopped=True, keep_stopped=True)
            resident = cls._install(process, capacity=capacity, thread=held)
            resident.held = held
            return resident
        existing = cls._find(process)
        if existing is not None:
            return existing
        unfinished = wait_unfinished(process)
        if unfinished:
            # A tool died between starting the agent thread and releasing it.
            u = unfinished[0]
            resident = cls._finish_install(process, capacity=u.capacity, fd=u.fd, base=u.base, stub=u.stub,
                                           inode=u.inode)
            resident.finished_install = True
            return resident
        return cls._install(process, capacity=capacity)

    @classmethod
    def _find(cls, process: Process) -> Resident | None:
        # Only a region whose agent lives here: one inherited through fork is
        # shared with the parent (and locked by the parent's session); the
        # child gets a region of its own (poke/recover.py copies the state).
        owned = [r for r in find_regions(process) if r.owned]
        if not owned:
            return None
        region = owned[0]
        base = region.base
        path = _region_path(process, base=base, end=base + CODE_SIZE, inode=region.inode, fd=region.fd)
        lock_fd = _take_lock(process.pid, path)
        try:
            local = _open_checked(process.pid, path, os.fstat(lock_fd).st_size, region.inode)
        except BaseException:
            os.close(lock_fd)
            raise
        if _u64(local, CODE_SIZE + HDR_MAGIC) != MAGIC or _u32(local, CODE_SIZE + HDR_VERSION) != VERSION:
            local.close()
            os.close(lock_fd)
            raise InjectionError(
                f"process {process.pid} holds textpoke state of another version",
                hint="use the textpoke version that attached first, or restart the process",
            )
        resident = cls(process, base=base, local=local, lock_fd=lock_fd, created=False)
        try:
            resident._wait_agent()  # an agent found by where it blocks may not have published its tid yet
            resident._check_agent()
            resident._drop_stub()  # an install cut short after releasing the agent
        except BaseException:
            resident.close()
            raise
        return resident

    @classmethod
    def _install(cls, process: Process, *, capacity: int, thread: BorrowedThread | None = None) -> Resident:
        """Install the resident part. Only step 1 stops a thread:

        1. borrow one thread (the code is generated and the gadgets found before
           it stops); in it, through its restore frame (target/inject.py):
           mmap the two stub pages (RX), write _install_stub there, and run
           its clone with every signal blocked; restore the thread and detach;
        2. meanwhile the new thread, signals blocked from birth, creates and
           maps the memfd and posts to the stub's mailbox (_await_stub);
        3. :meth:`_finish_install`.
        A tool killed in step 1 leaves the borrowed thread to rt_sigreturn to
        its own state; one killed after it leaves the new thread waiting, and
        the next attach finishes the install (find_unfinished).
        """
        blob, offsets = generate_code(capacity=capacity)
        size = region_size(capacity)
        stub = _install_stub(size=size, agent_offset=offsets["agent"], capacity=capacity)
        thread = thread or BorrowedThread(process, exclude=our_threads(process))
        thread.prepare()  # find the gadgets before anything stops
        with thread:
            pages = thread.syscall(sc.SYS_mmap, 0, STUB_PAGES * PAGE, sc.PROT_READ | sc.PROT_EXEC,
                                   sc.MAP_PRIVATE | sc.MAP_ANONYMOUS, -1, 0)
            process.write(pages, stub)
            thread.syscall_at(pages, sc.SYS_clone, sc.CLONE_THREAD_FLAGS, 0, 0, 0, 0, block_signals=True)
        fd, base = _await_stub(process, pages)
        inode = next((m.inode for m in process.maps() if m.start == base), 0)
        resident = cls._finish_install(process, capacity=capacity, fd=fd, base=base, stub=pages, inode=inode)
        resident.attach_stop_ns = thread.stopped_ns
        resident.attach_wait_ns = thread.stop_wait_ns
        resident.record_thread_abi(thread)
        return resident

    @classmethod
    def _finish_install(cls, process: Process, *, capacity: int, fd: int, base: int, stub: int,
                        inode: int) -> Resident:
        """Steps after the agent thread exists, none of which stops anything:

        1. take the session lock and map the memfd in the tool (through the
           target's descriptor, which stays open for later sessions); write
           code and header; release the agent (HDR_READY, last);
        2. wait for the agent;
        3. through the agent: unmap the stub pages, register for membarrier
           SYNC_CORE, and install the SIGTRAP
           handler (the old disposition saved in the control region, for the
           handler's not-ours path).
        """
        blob, _ = generate_code(capacity=capacity)
        size = region_size(capacity)
        path = _region_path(process, base=base, end=base + CODE_SIZE, inode=inode, fd=fd)
        lock_fd = _take_lock(process.pid, path)
        try:
            local = _open_checked(process.pid, path, size, inode)
        except BaseException:
            os.close(lock_fd)
            raise
        local[: len(blob)] = blob
        ctl = CODE_SIZE
        struct.pack_into("<QII", local, ctl + HDR_MAGIC, MAGIC, VERSION, TABLE_OFFSET)
        struct.pack_into("<QQQQQ", local, ctl + HDR_TABLE_CAPACITY, capacity,
                         base + ctl, ctl_size(capacity), base, CODE_SIZE)
        struct.pack_into("<Q", local, ctl + HDR_ALL_SIGNALS, 0xFFFF_FFFF_FFFF_FFFF)
        struct.pack_into("<qq", local, ctl + HEAL_POLL_TS, 0, HEAL_POLL_NS)
        struct.pack_into("<I", local, ctl + HDR_READY, 1)  # last: releases the agent
        _ptrace.futex_wake(_ptrace.buffer_address(local, ctl + HDR_READY))
        resident = cls(process, base=base, local=local, lock_fd=lock_fd, created=True)
        try:
            resident._wait_agent()
            resident._drop_stub()
            resident.register_membarrier()
            resident.tune_agent()
            action = struct.pack("<QQQQ", resident.labels["handler"], HANDLER_FLAGS, resident.labels["restorer"], 0)
            resident.ctl[SCRATCH : SCRATCH + len(action)] = action
            resident.syscall(sc.SYS_rt_sigaction, sc.SIGTRAP, resident.ctl_address + SCRATCH,
                             resident.ctl_address + OLD_ACTION, _SIGSET_SIZE)
        except BaseException:
            resident.close()
            raise
        return resident

    @property
    def handler_flags(self) -> int:
        """sa_flags for a handler copy of this region: SA_NODEFER only over code whose
        not-ours path blocks SIGTRAP itself (a region installed by an older textpoke
        has the same layout and version, but not that code)."""
        blob, _ = generate_code(capacity=self.capacity)
        if bytes(self.local[: len(blob)]) == blob:
            return HANDLER_FLAGS
        return HANDLER_FLAGS & ~sc.SA_NODEFER

    @property
    def clean(self) -> bool:
        """Every site the ledger knows holds its baseline (HDR_CLEAN): nothing to recover."""
        return _u32(self.ctl, HDR_CLEAN) == 1

    def mark_clean(self, clean: bool) -> None:
        """Set or clear HDR_CLEAN (one aligned store; cleared before any change is made)."""
        struct.pack_into("<I", self.ctl, HDR_CLEAN, int(clean))

    def register_membarrier(self) -> None:
        """Register for membarrier SYNC_CORE (the sync), once per process image."""
        prepared = _u32(self.ctl, HDR_PREPARED)
        if not prepared & PREPARED_MEMBARRIER:
            self.syscall(sc.SYS_membarrier, sc.MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0)
            struct.pack_into("<I", self.ctl, HDR_PREPARED, _u32(self.ctl, HDR_PREPARED) | PREPARED_MEMBARRIER)

    def tune_agent(self) -> None:
        """Give the agent a short scheduler slice (its policy and nice kept), once.

        Every sync is a request the agent serves; woken among busy threads of a
        fair policy, it would wait for their slices first (milliseconds each on a
        loaded machine). A short slice makes the kernel run it at once (EEVDF,
        Linux 6.12); it uses microseconds of CPU per request. A kernel that does
        not know the attribute ignores it; one that refuses it changes nothing."""
        if _u32(self.ctl, HDR_PREPARED) & PREPARED_AGENT_SLICE:
            return
        try:
            with open(f"/proc/{self.process.pid}/task/{self.agent_tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            nice, policy = int(fields[16]), int(fields[38])
        except (OSError, ValueError, IndexError):
            return
        if policy in _FAIR_POLICIES:
            attr = struct.pack(_SCHED_ATTR, struct.calcsize(_SCHED_ATTR), policy, 0, nice, 0, AGENT_SLICE_NS,
                               0, 0, 0, 0)
            self.ctl[_SCHED : _SCHED + len(attr)] = attr
            try:
                self.syscall(sc.SYS_sched_setattr, 0, self.ctl_address + _SCHED, 0)
            except InjectionError:
                pass  # refused (a security module, say): the agent keeps the default slice
        struct.pack_into("<I", self.ctl, HDR_PREPARED, _u32(self.ctl, HDR_PREPARED) | PREPARED_AGENT_SLICE)

    def record_thread_abi(self, thread: BorrowedThread) -> None:
        """Record what the thread borrowed at install showed (ABI_*), for the thread-ABI
        check of later captures; nothing for a thread without a thread pointer yet (a
        spawned program at its entry point)."""
        fs_base = thread.saved_regs.fs_base
        if not fs_base:
            return
        area, _, signature = thread.rseq_config or (0, 0, 0)
        struct.pack_into("<IQQI", self.ctl, ABI_RSEQ_SIG, signature, fs_base, area, int(thread.rseq_config is not None))
        struct.pack_into("<I", self.ctl, ABI_TID, thread.tid)  # last: the record counts

    def _drop_stub(self) -> None:
        """Unmap the install stub's pages once the agent has left them."""
        stub = _u64(self.ctl, HDR_INSTALL_STUB)
        if stub:
            self.syscall(sc.SYS_munmap, stub, STUB_PAGES * PAGE)
            struct.pack_into("<Q", self.ctl, HDR_INSTALL_STUB, 0)

    # -- the agent ------------------------------------------------------------------
    def _wait_agent(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while _u32(self.ctl, HDR_AGENT_TID) == 0:
            if time.monotonic() > deadline:
                if self.process.stopped():
                    raise TargetStopped(f"process {self.process.pid} was stopped while textpoke started its agent")
                raise InjectionError(f"the sync agent did not start in process {self.process.pid}")
            time.sleep(0.0002)

    @property
    def agent_tid(self) -> int:
        return _u32(self.ctl, HDR_AGENT_TID)

    def _check_agent(self) -> None:
        tid = self.agent_tid
        if not tid or not os.path.exists(f"/proc/{self.process.pid}/task/{tid}"):
            raise InjectionError(
                f"textpoke's agent thread is gone from process {self.process.pid}",
                hint="the process probably forked after textpoke attached to its parent",
            )

    def syscall(self, nr: int, *args: int, timeout_s: float | None = None) -> int:
        """Run a syscall in the agent thread; no application thread stops.

        Pairs with the agent loop (_emit_agent): nr/args first, then the
        request number, then the wake; the agent stores the result before the
        done number, so reading done == request means the result is there."""
        ctl = self.ctl
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        # A request left unfinished (a killed tool, a timed-out call) is served
        # first: the agent may be loading its arguments right now.
        pending = _u32(ctl, MBX_REQUEST)
        if _u32(ctl, MBX_DONE) != pending:
            _ptrace.futex_wake(self._request_addr)  # its poster may have died before waking the agent
            self._wait_done(pending, timeout_s, wait_if_stopped=False)
        values = [v & 0xFFFF_FFFF_FFFF_FFFF for v in (*args, *[0] * (6 - len(args)))]
        struct.pack_into("<Q6Q", ctl, MBX_NR, nr, *values)
        request = (pending + 1) & 0xFFFF_FFFF
        struct.pack_into("<I", ctl, MBX_REQUEST, request)
        _ptrace.futex_wake(self._request_addr)
        self._wait_done(request, timeout_s, wait_if_stopped=True)
        result = struct.unpack_from("<q", ctl, MBX_RESULT)[0]
        if -4095 <= result < 0:
            raise InjectionError(
                f"syscall {nr} in process {self.process.pid} failed: {os.strerror(-result)}"
            )
        return result

    def _agent_state(self) -> str | None:
        """The agent thread's state letter (R, S, T, t, Z...), None if it is gone."""
        try:
            stat = open(f"/proc/{self.process.pid}/task/{self.agent_tid}/stat").read()
        except OSError:
            return None
        return stat[stat.rindex(")") + 2]

    def _wait_done(self, request: int, timeout_s: float, *, wait_if_stopped: bool) -> None:
        """Wait until the agent finished ``request``.

        A stopped target (SIGSTOP, a debugger) stops the agent too: we wait for
        it to continue until the deadline, then fail with TargetStopped, never
        hang; a request already pending from a failed call fails at once."""
        ctl, pid = self.ctl, self.process.pid
        deadline = time.monotonic() + timeout_s
        while (done := _u32(ctl, MBX_DONE)) != request:
            _ptrace.futex_wait(self._done_addr, done, 0.05)
            if _u32(ctl, MBX_DONE) == request:
                break
            # Wake the agent again: a tool killed between posting a request and
            # waking the agent leaves it asleep on a request it never saw.
            _ptrace.futex_wake(self._request_addr)
            if not self.process.alive():
                raise TargetExited(f"process {pid} exited")
            state = self._agent_state()
            if state is None or state in "ZX":
                if self.process.replaced():
                    raise TargetReplaced(f"process {pid} executed a new program (exec) while textpoke worked on it")
                self._check_agent()
                raise InjectionError(f"textpoke's agent in process {pid} died")
            if state in "Tt":
                if not wait_if_stopped or time.monotonic() > deadline:
                    raise TargetStopped(
                        f"process {pid} is stopped (SIGSTOP or a debugger), so textpoke's agent in it "
                        f"cannot run; waited {timeout_s:g} s for it to continue"
                    )
                continue
            if time.monotonic() > deadline:
                raise InjectionError(f"textpoke's agent in process {pid} does not answer")

    def sync(self) -> None:
        """Every thread of the target serializes (membarrier SYNC_CORE) before this returns."""
        self.syscall(sc.SYS_membarrier, sc.MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0)

    # -- more shared regions ---------------------------------------------------------
    def map_shared(self, *, code_size: int, data_size: int, near: int | None = None,
                   name: str = "textpoke-tramp", apart: bool = False, reuse: bool = False,
                   still_used: Callable[[int, int], bool] | None = None,
                   via: tuple[range, ...] = (), private: bool = False) -> SharedRegion:
        """A new memfd region in the target, mapped by the tool too, via the agent.

        The first ``code_size`` bytes are RX in the target (the tool's view is
        the only writable one), the ``data_size`` bytes after them RW in both.
        ``near``: the code is placed within rel32 reach of that address
        (trampolines called from sites). The data follows the code, so code
        reaches it rip-relatively, unless ``apart``: then it is a mapping of
        its own wherever the kernel puts it (big record buffers: the address
        space within reach of the program's code is scarce), and code must
        address it absolutely.

        ``reuse``: first try a region of the same sizes that an earlier session
        gave back (:meth:`release_shared`) and that nothing can still use
        (:meth:`_unused`, and ``still_used(start, end)`` False: what the layers above
        know, such as hooked frames that return through a session's exit routine
        there; a thread seen in ``via``, code that may call into the region, counts as
        inside): its code and data are zeroed (the code rseq-safe),
        at the same addresses. A region mapped
        anew is recorded so that it can be given back in its turn (its memfd
        descriptor stays open in the target for that). A region is never
        unmapped: a thread may be inside one, or its rseq_cs name one.

        ``private``: the target maps it MAP_PRIVATE (a hot-fix's code and data).
        What the tool writes through its view shows in the target until the target
        first writes a page (copy on write), so write everything before anything
        runs there; in exchange /proc/PID/mem can write its read-only code pages
        (the kernel refuses a forced write to a shared read-only mapping), so
        sites there can be patched like the program's own."""
        size = code_size + data_size
        if code_size % PAGE or data_size % PAGE or size == 0 or (apart and not (code_size and data_size)):
            raise UsageError("shared region sizes must be whole pages")
        if private and (apart or reuse):
            raise UsageError("a private region is neither apart nor reused")
        if reuse:
            found = self._reuse(code_size=code_size, data_size=data_size, near=near, apart=apart,
                                still_used=still_used, via=via)
            if found is not None:
                return found
        slot = self._free_slot() if reuse else -1
        raw = name.encode() + b"\0"
        self.ctl[SCRATCH : SCRATCH + len(raw)] = raw
        fd = self.syscall(sc.SYS_memfd_create, self.ctl_address + SCRATCH, sc.MFD_CLOEXEC)
        pid = self.process.pid
        keep = False
        try:
            inode = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
        except OSError as exc:
            raise InjectionError(f"textpoke's new memfd in process {pid} vanished: {exc.strerror}") from exc
        try:
            self.syscall(sc.SYS_ftruncate, fd, size)
            flags = sc.MAP_PRIVATE if private else sc.MAP_SHARED
            hint = 0
            first = code_size if apart else size
            if near is not None:
                hint = find_free_near(self.process.maps(), near, first)
                flags |= sc.MAP_FIXED_NOREPLACE
            address = self.syscall(sc.SYS_mmap, hint, first, sc.PROT_READ | sc.PROT_WRITE, flags, fd, 0)
            if code_size:
                self.syscall(sc.SYS_mprotect, address, code_size, sc.PROT_READ | sc.PROT_EXEC)
            data_address = address + code_size
            if apart:
                data_address = self.syscall(sc.SYS_mmap, 0, data_size, sc.PROT_READ | sc.PROT_WRITE,
                                            sc.MAP_SHARED, fd, code_size)
            # Checked against what is mapped: never a file of the program's.
            mapped = next((m.inode for m in self.process.maps() if m.start == address), 0)
            if mapped != inode:
                raise InjectionError(f"the memory textpoke mapped in process {pid} is not its memfd")
            local = _open_checked(pid, f"/proc/{pid}/fd/{fd}", size, inode)
            if slot >= 0:
                # Kept open: a later session opens the region through it to reuse it.
                self._record(slot, _IN_USE, fd=fd, address=address, code_size=code_size, data_size=data_size,
                             data_address=data_address, inode=inode, apart=apart)
                keep = True
        finally:
            if not keep and _still_ours(pid, fd, inode):
                self.syscall(sc.SYS_close, fd)
        return SharedRegion(address, size, local, data_address, slot=slot)

    def release_shared(self, region: SharedRegion) -> bool:
        """Give back a region mapped with ``reuse=True``, once its session ended:
        every site that led into it reverted. Its data pages' memory is returned
        (hole-punched: they read as zeros), and a later map_shared(reuse=True) of
        the same sizes may take it. False if it was not mapped for reuse."""
        if region.slot < 0:
            return False
        code_size = _u64(self.ctl, _rec(region.slot) + _REC_CODE)
        try:
            if region.size > code_size:
                region.local.madvise(mmap.MADV_REMOVE, code_size, region.size - code_size)
        except (OSError, ValueError):
            pass  # the memory stays allocated; the region is still reusable
        struct.pack_into("<I", self.ctl, _rec(region.slot) + _REC_STATE, _RELEASED)
        return True

    def released_regions(self) -> int:
        """Regions given back and not reused yet."""
        return sum(1 for k in range(RELEASED_SLOTS) if _u32(self.ctl, _rec(k)) == _RELEASED)

    def reusable_inodes(self) -> frozenset[int]:
        """Memfds of regions recorded for reuse (their descriptors stay open in the target)."""
        return frozenset(_u64(self.ctl, _rec(k) + _REC_INODE) for k in range(RELEASED_SLOTS)
                         if _u32(self.ctl, _rec(k)) != _FREE)

    def reclaim_released(self) -> None:
        """At attach: regions in use by a session that died are given back (the
        reuse still checks, each time, that nothing can use them any more), their
        data's memory returned now (hole-punched, as release_shared does): a region may
        wait long for its reuse, and its dead session's records are of use to no one
        (a thread still writing one gets a fresh zero page)."""
        pid = self.process.pid
        for k in range(RELEASED_SLOTS):
            if _u32(self.ctl, _rec(k)) != _IN_USE:
                continue
            fd, _, code, data, _, inode, _ = struct.unpack_from("<IQQQQQI", self.ctl, _rec(k) + _REC_FD)
            if data and _still_ours(pid, fd, inode):
                try:
                    local = _open_checked(pid, f"/proc/{pid}/fd/{fd}", code + data, inode)
                    try:
                        local.madvise(mmap.MADV_REMOVE, code, data)
                    finally:
                        local.close()
                except (TextpokeError, OSError, ValueError):
                    pass  # the memory stays allocated until the region is reused
            struct.pack_into("<I", self.ctl, _rec(k) + _REC_STATE, _RELEASED)

    @staticmethod
    def write_code(region: SharedRegion, code: bytes, offset: int = 0) -> None:
        """Write code into a region's code part in an order the kernel's rseq checks
        accept at every instant: a thread's rseq_cs may still name a descriptor of
        an earlier session in a reused region (the kernel reads it when that thread
        is preempted and sends SIGSEGV if it is malformed). Every post_commit_offset
        word (third word of a 32-byte aligned descriptor) is written last, each as
        one 8-byte store; before that they hold zero (set when the region was
        reused), and a descriptor with a zero post_commit_offset is valid and
        matches no instruction."""
        local = region.local
        local[offset : offset + len(code)] = code if not region.reused else _without_post_commit(code, offset)
        if region.reused:
            words = memoryview(local).cast("Q")
            for at in _post_commit_words(offset, len(code)):
                words[at // 8] = int.from_bytes(code[at - offset : at - offset + 8], "little")
            del words

    def _free_slot(self) -> int:
        return next((k for k in range(RELEASED_SLOTS) if _u32(self.ctl, _rec(k)) == _FREE), -1)

    def _record(self, slot: int, state: int, *, fd: int, address: int, code_size: int, data_size: int,
                data_address: int, inode: int, apart: bool) -> None:
        base = _rec(slot)
        struct.pack_into("<IQQQQQI", self.ctl, base + _REC_FD, fd, address, code_size, data_size, data_address,
                         inode, int(apart))
        struct.pack_into("<I", self.ctl, base + _REC_STATE, state)  # last: the record counts

    def _reuse(self, *, code_size: int, data_size: int, near: int | None, apart: bool,
               still_used: Callable[[int, int], bool] | None, via: tuple[range, ...]) -> SharedRegion | None:
        """A released region of these sizes within reach of ``near`` that nothing can use."""
        pid = self.process.pid
        for slot in range(RELEASED_SLOTS):
            base = _rec(slot)
            if _u32(self.ctl, base) != _RELEASED:
                continue
            fd, address, code, data, data_address, inode, was_apart = struct.unpack_from(
                "<IQQQQQI", self.ctl, base + _REC_FD)
            if (code, data, bool(was_apart)) != (code_size, data_size, apart):
                continue
            if near is not None and max(abs(address - near), abs(address + code_size - near)) > DEFAULT_REACH:
                continue
            if not _still_ours(pid, fd, inode) or not self._unused(address, address + code_size, via=via):
                continue
            if still_used is not None and still_used(address, address + code_size):
                continue
            struct.pack_into("<I", self.ctl, base + _REC_STATE, _IN_USE)
            local = _open_checked(pid, f"/proc/{pid}/fd/{fd}", code_size + data_size, inode)
            region = SharedRegion(address, code_size + data_size, local, data_address, slot=slot, reused=True)
            _zero_code(local, code_size)
            if data_size:  # zeros, as a new region's (written to after its release, perhaps)
                try:
                    local.madvise(mmap.MADV_REMOVE, code_size, data_size)
                except (OSError, ValueError):
                    local[code_size:] = bytes(data_size)
            return region
        return None

    def _unused(self, start: int, end: int, *, window_s: float = 0.05, via: tuple[range, ...] = ()) -> bool:
        """Whether nothing can still run code in [start, end): no site leads there
        (no table entry, no baseline: what sites hold, are becoming or return to),
        and every thread of the program was seen out of it within ``window_s``:
        blocked or stopped at another address (/proc/PID/task/TID/syscall), or
        running long enough to have finished any routine there (its CPU time grew
        by RAN_NS; a routine's longest path without a wait is under a microsecond:
        RCU-tasks' rule, with CPU time for the switches user space cannot see).
        Having left after the sites stopped leading there, a thread cannot come
        back (the trampolines leave no return address of theirs on a stack). Not
        covered: a thread whose signal handler interrupted it inside the region and
        runs or blocks elsewhere through the whole window. A thread seen in ``via``
        (code that calls into the region, such as the graph runtime's return path,
        which calls a session's exit routine) is not out either."""
        for sites, insns in (self.table.entry_arrays(), self.ledger.baselines.entry_arrays()):
            branch = (insns[:, 0] == CALL_OPCODE) | (insns[:, 0] == JMP_OPCODE)
            targets = rel32_targets(sites[branch], insns[branch])
            if ((targets >= start) & (targets < end)).any():
                return False
        return self._threads_outside(start, end, window_s, via)

    def threads_left(self, start: int, end: int, *, limit_s: float) -> bool:
        """Whether every thread of the program (not ours) was seen out of [start, end)
        within ``limit_s``: blocked at another address, or having run RAN_NS of CPU
        since this call began (so whatever it was doing there then, it has finished)."""
        return self._threads_outside(start, end, limit_s)

    def _threads_outside(self, start: int, end: int, window_s: float, via: tuple[range, ...] = ()) -> bool:
        pid = self.process.pid
        ours = {self.agent_tid} | set(our_threads(self.process))
        pending = {tid: thread_cpu_ns(pid, tid) for tid in set(self.process.threads()) - ours}
        deadline = time.monotonic() + window_s
        while True:
            for tid, began in list(pending.items()):
                pc = thread_pc(pid, tid)
                ran = thread_cpu_ns(pid, tid)
                elsewhere = pc is not None and not pc_in(pc, range(start, end), *via)
                if ran is None or elsewhere or (began is not None and ran - began >= RAN_NS):
                    del pending[tid]
            if not pending:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)

    # -- the watch: the agent finishes a batch whose tool died (guard.py) -------------
    @property
    def watch_state(self) -> int:
        return _u32(self.ctl, WATCH_STATE)

    def _fd_inode(self, fd: int) -> int | None:
        """st_ino of the target's descriptor ``fd`` as the agent sees it (fstat); None if not open."""
        try:
            self.syscall(sc.SYS_fstat, fd, self.ctl_address + _FSTAT)
        except InjectionError:
            return None
        return _u64(self.ctl, _FSTAT + sc.STAT_INO)

    def open_watch(self) -> bool:
        """Give the agent what healing needs, once per session: a descriptor of
        /proc/self/mem (kept for the region's life, checked by inode) and a
        pidfd of this tool. False if this kernel or target cannot (no pidfd_open,
        no /proc): batches then go unwatched, as before the agent could heal."""
        if self._watch is not None:
            return self._watch
        self._watch = False
        fd, inode = _u32(self.ctl, MEM_FD), _u64(self.ctl, MEM_INO)
        if not inode or self._fd_inode(fd) != inode:
            path = b"/proc/self/mem\0"
            self.ctl[SCRATCH : SCRATCH + len(path)] = path
            try:
                fd = self.syscall(sc.SYS_openat, sc.AT_FDCWD, self.ctl_address + SCRATCH, sc.O_RDWR | sc.O_CLOEXEC, 0)
            except InjectionError:
                return False
            inode = self._fd_inode(fd)
            if inode is None:
                return False
            struct.pack_into("<Q", self.ctl, MEM_INO, inode)
            struct.pack_into("<I", self.ctl, MEM_FD, fd)
        self._close_pidfd()  # one a killed tool left
        try:
            pidfd = self.syscall(sc.SYS_pidfd_open, os.getpid(), 0)
        except InjectionError:
            return False
        inode = self._fd_inode(pidfd)
        if inode is None:
            return False
        struct.pack_into("<Q", self.ctl, WATCH_PIDFD_INO, inode)
        struct.pack_into("<II", self.ctl, WATCH_PIDFD, pidfd, os.getpid())
        self._watch = True
        return True

    def _close_pidfd(self) -> None:
        """Close the watch's pidfd if it is still the one recorded (the program may have reused the number)."""
        inode = _u64(self.ctl, WATCH_PIDFD_INO)
        if not inode:
            return
        fd = _u32(self.ctl, WATCH_PIDFD)
        struct.pack_into("<Q", self.ctl, WATCH_PIDFD_INO, 0)
        if self._fd_inode(fd) == inode:
            self.syscall(sc.SYS_close, fd)

    def arm(self) -> None:
        """From now on the agent finishes the batch if this tool dies (before the first int3).

        The agent may be asleep without a timeout (it was idle): one request
        (getpid) moves it on past its next look at WATCH_STATE, into timed sleeps."""
        if self._watch:
            struct.pack_into("<I", self.ctl, WATCH_STATE, WATCH_ARMED)
            self.syscall(sc.SYS_getpid)

    def disarm(self, timeout_s: float = 10.0) -> bool:
        """After the batch's last sync (or its rollback): the agent stops watching;
        threads waiting at the gate (none, while this tool lives) may go. False if
        the agent had taken the batch over (it took this tool for dead: the
        program reused the pidfd's number); then it is waited for: it writes
        what this tool wrote, the entries."""
        if not self._watch:
            return True
        address = _ptrace.buffer_address(self.local, CODE_SIZE + WATCH_STATE)
        old = _ptrace.cmpxchg_u32(address, WATCH_ARMED, WATCH_IDLE)
        if old != WATCH_ARMED:
            deadline = time.monotonic() + timeout_s
            while self.watch_state == WATCH_HEALING and time.monotonic() < deadline:
                _ptrace.futex_wait(address, WATCH_HEALING, 0.01)
            struct.pack_into("<I", self.ctl, WATCH_STATE, WATCH_IDLE)
        _ptrace.futex_wake(address, 0x7FFF_FFFF)
        return old == WATCH_ARMED

    def settle_watch(self, *, grace_s: float = 2.0) -> AgentHeal | None:
        """At attach, before anything is surveyed: let a heal of the agent's end.

        A tool that died mid-batch left WATCH_STATE armed; the agent finishes
        the batch as soon as the tool's pidfd reports it gone (it may still be
        exiting: its lock is released before that). If the agent has not taken
        the batch after ``grace_s`` (it cannot tell: the program closed the
        pidfd), this tool takes it (cmpxchg, so never both) and the recovery
        batch finishes it; :meth:`end_watch` then opens the gate. Returns what
        the agent finished since the last attach looked (who and how many sites)."""
        address = _ptrace.buffer_address(self.local, CODE_SIZE + WATCH_STATE)
        start = time.monotonic()
        while (state := self.watch_state) in (WATCH_ARMED, WATCH_HEALING):
            _ptrace.futex_wake(self._request_addr)
            if not self.process.alive():
                raise TargetExited(f"process {self.process.pid} exited")
            waited = time.monotonic() - start
            if state == WATCH_HEALING and waited > self.timeout_s:
                if self._agent_state() in ("T", "t"):
                    raise TargetStopped(f"process {self.process.pid} is stopped while textpoke's agent finishes "
                                        "the batch of a killed textpoke")
                raise InjectionError(f"textpoke's agent in process {self.process.pid} does not finish the batch "
                                     "of a killed textpoke")
            if state == WATCH_ARMED and waited > grace_s:
                if _ptrace.cmpxchg_u32(address, WATCH_ARMED, WATCH_TAKEN) == WATCH_ARMED:
                    break
            _ptrace.futex_wait(address, state, 0.005)
        batches, seen = _u64(self.ctl, HEAL_BATCHES), _u64(self.ctl, HEAL_REPORTED)
        if batches == seen:
            return None
        struct.pack_into("<Q", self.ctl, HEAL_REPORTED, batches)
        return AgentHeal(tool_pid=_u32(self.ctl, HEAL_PID), sites=_u64(self.ctl, HEAL_SITES), batches=batches - seen,
                         failed_writes=_u32(self.ctl, HEAL_FAILED))

    def end_watch(self) -> None:
        """After recovery: a batch the agent healed or this tool took is over; the gate opens."""
        if self.watch_state in (WATCH_HEALED, WATCH_TAKEN):
            struct.pack_into("<I", self.ctl, WATCH_STATE, WATCH_IDLE)
            _ptrace.futex_wake(_ptrace.buffer_address(self.local, CODE_SIZE + WATCH_STATE), 0x7FFF_FFFF)

    # -- statistics -------------------------------------------------------------------
    def stats(self) -> ResidentStats:
        return ResidentStats(*(_u64(self.ctl, off) for off in (STAT_EMULATED, STAT_NOT_OURS, STAT_SYNCS, STAT_REQUESTS)))

    # -- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        """Release the tool's view and the session lock; the target keeps everything."""
        if self._lock_fd < 0:
            return
        if self._watch and self.watch_state == WATCH_IDLE and not self.process.stopped():
            try:
                self._close_pidfd()
            except TextpokeError:
                pass  # the target exited, or its agent cannot run: the descriptor goes with it
        try:
            del self.table
            del self.ledger
            self.ctl.release()
            self.local.close()
        except BufferError:
            # An exception in flight (its traceback's frames) still holds the
            # table's arrays; the mapping is unmapped when they go. The lock
            # must not wait for that.
            pass
        finally:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Resident:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


__all__ = ["AgentHeal", "Resident", "ResidentStats", "SharedRegion", "generate_code", "region_size", "wait_unfinished"]
