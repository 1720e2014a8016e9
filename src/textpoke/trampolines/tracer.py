"""Tracing trampolines: entry tracer, call-site tracer and per-CPU counters.

Every traced site calls a 16-byte stub in a code region mapped near it, and
the stub enters one of two shared routines per mode:

- fentry site (``nop5`` -> ``call stub``): ``mov r11, imm64; jmp record_entry``
  (imm64: the site id in the high half; for counters, the address of the
  site's counter). The routine returns straight into the traced function.
- call site (``call F`` -> ``call stub``): ``call record_call; jmp F``. The
  routine finds the site id from its return address (stub i + 5) and returns
  to the stub, which jumps to the original callee with every register, ``al``
  (the vector count of a varargs call) and the stack as the site left them:
  F sees the return address the site pushed, and call/ret stay paired for the
  return predictor and shadow stacks.

The routines push and pop what they use (``rax rcx rdx rsi``, less for the
counters; copies in xmm8-12 instead measured 1.5 ns slower per call), take no
lock and make no syscall. Flags are dead at a call boundary. At an fentry site
r11 is clobbered, which the ABI allows and gcc's -fipa-ra cannot exploit (it
is off under -pg, the build that makes fentry sites); a call site's routine
keeps r11 too, so even a caller that knows its callee leaves r11 alone (gcc
-fipa-ra on calls within a unit) is safe.

**Why rseq.** Measured here (Xeon @2.5 GHz VM, C microbenchmarks): rdtsc +
store 8.9 ns, rdtscp + store 15.0 ns, ``lock inc`` 5.9 ns, ``lock cmpxchg``
10.1 ns; rdtscp + cmpxchg reservation + record 24.3 ns, rdtscp + per-CPU ``lock
inc`` 19.7 ns. A per-CPU slot taken with plain loads and stores is exact only
inside a restartable sequence: glibc (2.35+) registers every thread's ``struct
rseq`` at ``fs:__rseq_offset``; the routine points its ``rseq_cs`` at our
descriptor (a compare first: usually it still does), reads ``cpu_id``, and if
the thread is preempted, migrated or signalled before the one committing
store (the new head; for counters, the ``inc``), the kernel restarts it at our
abort handler. So every call commits exactly one record, or one count, or
counts one loss, with no atomic instruction. bench/overhead.py shows the
result against the alternatives, ns added per call at T=1/T=2: record 11.8/12.0
with rseq, 20.5/167 with the cmpxchg buffer; counter 2.3/2.3 per CPU with rseq,
6.5/31 with one shared ``lock inc``.
Threads without rseq (registration failed, glibc too old or told not to)
find ``cpu_id`` out of range and take the fallback, still exact: one shared
buffer with a ``lock cmpxchg`` reservation that checks space first and a
commit word (the nonzero timestamp) written last; a shared counter row with
``lock inc``.

**Thread identity.** glibc keeps the kernel tid in ``struct pthread`` at
``fs:0x2d0`` on x86-64; :func:`probe_thread_abi` checks that on one briefly
seized thread (its ``fs_base`` from ptrace, the u32 at ``fs_base + 0x2d0``
against its tid) and checks the rseq registration with
``PTRACE_GET_RSEQ_CONFIGURATION`` (area address and signature). If the tid
check fails the record holds the low 32 bits of the thread pointer instead,
read from ``fs:0`` (the x86-64 TLS ABI puts the thread pointer there in every
libc, so neither FSGSBASE/rdfsbase nor a syscall is needed): opaque, but
distinct per live thread.

Every thread that runs traced code must have a libc TLS block at ``fs`` (true
for threads made by pthread_create); the routines read and write it.
"""

from __future__ import annotations

import contextlib
from errno import ESRCH

import enum
import mmap
import operator
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np
from iced_x86 import Decoder

from .._errors import InjectionError, TargetError, TextpokeError, UsageError
from ..poke.bulk import PatchArray
from ..poke.resident import (ABI_RSEQ_KNOWN, ABI_RSEQ_SIG, ABI_TID, CODE_SIZE, FLAGS_PAGE, PAGE, Resident,
                             SharedRegion, find_regions)
from ..sites.elffile import open_file
from ..sites.process import mapped_object
from ..target import _ptrace
from ..target._ptrace import FUTEX_WAIT, FUTEX_WAKE  # shared futexes: the tool maps the same memfd
from ..target.inject import BorrowedThread, choose_thread
from ..target.process import Process
from ..target.syscalls import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    SYS_futex,
    SYS_kill,
    SYS_mmap,
)
from ..x86.asm import Asm, Imm64, R, fs, mem
from . import graph
from .layout import (
    CTL_HEAD,
    CTL_LIMIT,
    CTL_LOST,
    CTL_WAITERS,
    HDR_BELL,
    HDR_DEADLINE,
    HDR_READER_PID,
    HDR_SHADOW_FULL,
    HDR_SHADOW_NO_THREAD,
    HDR_SLEEPING,
    HEADER_SIZE,
    SLOT_ARG0,
    SLOT_CALLER,
    SLOT_SITE,
    SLOT_SIZE,
    SLOT_TID,
    SLOT_TS,
    SLOTS_OFFSET,
)
from ..x86.insn import CALL_SIZE, INT3, encode_calls, encode_jmp, encode_jmps, rel32_target, rel32_targets

# -- the kernel's and glibc's ABI ------------------------------------------------------
#: glibc's rseq signature on x86 (the 4 bytes before every abort handler).
RSEQ_SIG = 0x53053053
#: struct rseq: u32 cpu_id_start, u32 cpu_id, u64 rseq_cs, ...
RSEQ_CPU_ID = 4
RSEQ_CS = 8
#: struct rseq_cs: u32 version, u32 flags, u64 start_ip, u64 post_commit_offset, u64 abort_ip.
RSEQ_CS_SIZE = 32
_RSEQ_CS_FORMAT = "<IIQQQ"
#: ``struct pthread``'s ``tid`` on x86-64 glibc.
GLIBC_TID_OFFSET = 0x2D0
#: x86-64 TLS ABI: the word at fs:0 is the thread pointer itself.
TCB_SELF = 0
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
SYS_madvise = 28
MADV_POPULATE_WRITE = 23  # Linux 5.14
MADV_WIPEONFORK = 18  # Linux 4.14
_RSEQ_CONFIGURATION = "<QIIII"  # rseq_abi_pointer, size, signature, flags, pad

# -- the shared memory the routines write: trampolines/layout.py ------------------------
#: How long one wait of a writer sleeps at most before it looks again (futex timeout).
WAIT_SLICE_NS = 1_000_000
#: Largest buffer: the whole region must stay within rel32 reach of the sites.
MAX_CAPACITY = 1 << 24
#: Records a ring holds by default: 24 MiB of slots (on 2 CPUs, three buffers of 256k).
DEFAULT_RING_RECORDS = 768 << 10
#: How far ahead of the slot being written the routine prefetches (with intent to
#: write); within the guard page after the slots when it runs past their end.
PREFETCH_AHEAD = 4 * 64

# -- code layout -----------------------------------------------------------------------
STUB_SIZE = 16
STUB_SHIFT = 4
_DESCRIPTORS = 0  # rseq_cs descriptors, 32 bytes each (aligned), one per routine with a sequence:
#                   entry routine, call routine, graph_entry, graph_exit
_DESCRIPTOR_SLOTS = 4
_CONST_BLOCKS = 128  # u64: address of buffer block 0 (trace) / counter row 0 (count)
_CONST_STUB_RETURN = 136  # u64: stub 0 + 5, the return address of stub 0's call
_CONST_WAIT_SLICE = 144  # struct timespec (16 bytes): one wait slice of a writer
_CONST_HEADER = 160  # u64: address of the ring header (trace)
_CONST_ENABLED = 168  # u64: address of the session's flag page (see _emit_enabled_check)
#: The graph runtime's addresses (trampolines.graph), for graph_entry and the hook stubs:
#: shadow_slot, the table, the frames, graph_return, the counters, graph_restore,
#: graph_rehook, and this region's own graph_exit.
_CONST_GRAPH = 176
_G_SLOT, _G_TABLE, _G_FRAMES, _G_RETURN, _G_COUNTERS, _G_RESTORE, _G_REHOOK, _G_EXIT, _G_UNWOUND, _G_HASH = (
    _CONST_GRAPH + 8 * i for i in range(10))
_ROUTINES = 256
assert _CONST_GRAPH + 8 * 10 <= _ROUTINES and _DESCRIPTORS + RSEQ_CS_SIZE * _DESCRIPTOR_SLOTS <= _CONST_BLOCKS
_STUBS = PAGE
#: Registers the routines borrow (record: rdtsc's rax/rdx, a block and a slot pointer).
_RECORD_REGS = (R.RAX, R.RCX, R.RDX, R.RSI)
_COUNT_REGS = (R.RAX, R.RCX)


class Mode(enum.Enum):
    """What the routine does per call."""

    TRACE = "trace"  # one record in the ring
    COUNT = "count"  # one increment of the site's per-CPU counter


class StubKind(enum.Enum):
    """How the site reaches its stub, and where the stub goes afterwards."""

    ENTRY = "entry"  # fentry nop5: return to the traced function
    CALL = "call"  # call rel32: continue to the original callee
    REHOOK = "rehook"  # a call to __cxa_begin_catch: graph_rehook, then the callee (graph mode)
    RESTORE = "restore"  # a call that unwinds the thread (pthread_exit): graph_restore, then the callee


@dataclass(frozen=True)
class TracedSite:
    """One site to trace: its current bytes and, for call sites, the callee they call."""

    address: int
    kind: StubKind
    original: bytes

    @property
    def callee(self) -> int | None:
        return None if self.kind is StubKind.ENTRY else rel32_target(self.address, self.original)


@dataclass(frozen=True)
class ThreadAbi:
    """How the routines find the thread id and the thread's rseq area (fs offsets)."""

    cpus: int  # per-CPU buffers/rows (possible CPUs); 0 when rseq is not used
    tid_offset: int | None  # fs offset of the kernel tid; None: low bits of the thread pointer
    rseq_offset: int | None  # fs offset of struct rseq; None: every thread takes the fallback
    note: str  # how this was established (for diagnostics)


@dataclass(frozen=True)
class RingGeometry:
    """Record buffers: ``cpus`` rseq buffers, then one shared fallback buffer."""

    cpus: int
    capacity: int  # records per buffer, a power of two

    @classmethod
    def for_records(cls, records: int, *, cpus: int) -> RingGeometry:
        """At least ``records`` slots in all (up to MAX_CAPACITY per buffer): split over
        the buffers, each rounded up to a power of two (the routines mask the head)."""
        buffers = cpus + 1
        per = max(-(-records // buffers), 16)
        capacity = 1 << (per - 1).bit_length()
        return cls(cpus=cpus, capacity=min(capacity, MAX_CAPACITY))

    @property
    def buffers(self) -> int:
        return self.cpus + 1

    @property
    def fallback(self) -> int:
        return self.cpus

    @property
    def bytes(self) -> int:
        """Bytes of slots per buffer."""
        return self.capacity * SLOT_SIZE

    @property
    def blocks_offset(self) -> int:
        return HEADER_SIZE

    @property
    def stride(self) -> int:
        """Bytes from one buffer's block to the next: control page, slots, a guard
        page (the routines prefetch a few lines ahead of the slot they fill)."""
        return SLOTS_OFFSET + _page_up(self.bytes) + PAGE

    @property
    def size(self) -> int:
        return self.blocks_offset + self.buffers * self.stride


@dataclass(frozen=True)
class CounterGeometry:
    """Counter rows: ``cpus`` rseq rows, then one shared fallback row; u64 per site."""

    cpus: int
    sites: int

    @property
    def rows(self) -> int:
        return self.cpus + 1

    @property
    def row_bytes(self) -> int:
        # A power of two (the routine shifts the cpu number) of whole cache lines.
        return max(64, 1 << (max(self.sites * 8, 1) - 1).bit_length())

    @property
    def rows_offset(self) -> int:
        return HEADER_SIZE

    @property
    def size(self) -> int:
        return _page_up(self.rows_offset + self.rows * self.row_bytes)


#: The process's page of session flags (private, anonymous; its address in the resident
#: header, FLAGS_PAGE): u64 magic, u64 the next free byte, then one byte per session.
_FLAGS_MAGIC = int.from_bytes(b"TPKFLAGS", "little")
_FLAGS_FIRST = 16


def _session_flag(resident: Resident) -> int:
    """A byte of the target's own memory holding 1 while this session records (see
    _emit_enabled_check): on the process's flags page (private, anonymous,
    MADV_WIPEONFORK: a forked child reads zeros there), one byte per session, a new
    page when one is used up. The session lock is held: no other tool takes a byte
    meanwhile."""
    process = resident.process
    page = struct.unpack_from("<Q", resident.ctl, FLAGS_PAGE)[0]
    if page:
        magic, used = struct.unpack("<QQ", process.read(page, 16))
        if magic == _FLAGS_MAGIC and used < PAGE:
            process.write(page, struct.pack("<QQ", _FLAGS_MAGIC, used + 1))
            process.write(page + used, b"\1")
            return page + used
    page = resident.syscall(SYS_mmap, 0, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    try:
        resident.syscall(SYS_madvise, page, PAGE, MADV_WIPEONFORK)
    except InjectionError as exc:
        raise InjectionError(f"the kernel refused MADV_WIPEONFORK ({exc.message}): Linux 4.14 or later is needed",
                             hint="textpoke needs it so that a forked child never writes into the parent's trace"
                             ) from exc
    process.write(page, struct.pack("<QQ", _FLAGS_MAGIC, _FLAGS_FIRST + 1))
    process.write(page + _FLAGS_FIRST, b"\1")
    struct.pack_into("<Q", resident.ctl, FLAGS_PAGE, page)
    return page + _FLAGS_FIRST


def _page_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


# ---------------------------------------------------------------------------
# Finding the thread ABI of a target
# ---------------------------------------------------------------------------


def possible_cpus() -> int:
    """Number of CPU ids the kernel may report (rseq ``cpu_id`` < this)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


_ELF64_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"),
                       ("size", "<u8")])


def _symbol_values(path: str, names: Sequence[bytes]) -> list[int | None]:
    """``st_value`` of each defined symbol named in ``names`` (.dynsym first, then
    .symtab), None where there is none: a look at two tables, no symbol objects."""
    found: list[int | None] = [None] * len(names)
    with open_file(path) as elf:
        for table_name in (".dynsym", ".symtab"):
            table = elf.section(table_name)
            strings = elf.linked(table) if table is not None else None
            if table is None or strings is None:
                continue
            raw = elf.data(table)
            symbols = np.frombuffer(raw, dtype=_ELF64_SYM, count=len(raw) // _ELF64_SYM.itemsize)
            text = elf.data(strings)
            for i, name in enumerate(names):
                at = text.find(b"\0" + name + b"\0")
                while found[i] is None and at >= 0:
                    match = symbols[(symbols["name"] == at + 1) & (symbols["shndx"] != 0)]
                    if len(match):
                        found[i] = int(match["value"][0])
                    at = text.find(b"\0" + name + b"\0", at + 1)
    return found


def _glibc_rseq(process: Process) -> tuple[int, int] | None:
    """(``__rseq_offset``, ``__rseq_size``) of the target's glibc, or None.

    The symbols live in ld.so (dynamic programs) or the executable (static
    ones); their values are read from the live process, since glibc sets
    ``__rseq_size`` to 0 when it did not register rseq."""
    for path in ("ld-linux", None):
        try:
            obj, image = mapped_object(process.pid, path=path)
        except (UsageError, TargetError):
            continue
        try:
            values = _symbol_values(obj.elf_path, (b"__rseq_offset", b"__rseq_size"))
        except (OSError, TextpokeError):
            continue
        if None in values:
            continue
        offset = struct.unpack("<q", process.read(values[0] + obj.base, 8))[0]
        size = struct.unpack("<I", process.read(values[1] + obj.base, 4))[0]
        return offset, size
    return None


@dataclass(frozen=True)
class _ThreadSeen:
    """What one thread's stop showed: its tid, thread pointer and rseq registration
    (``pointer``/``signature`` None: the kernel cannot tell)."""

    tid: int
    fs_base: int
    pointer: int | None
    signature: int | None


def _recorded_thread(process: Process) -> tuple[_ThreadSeen | None, int | None]:
    """The thread the resident part's install borrowed (ABI_* in its header), if that
    thread still lives: a capture checks the thread ABI on it without stopping
    anything. Also the header's address in the target (None: no resident part)."""
    region = next((r for r in find_regions(process) if r.owned), None)
    if region is None:
        return None, None
    header = region.base + CODE_SIZE
    try:
        raw = process.read(header + ABI_TID, ABI_RSEQ_KNOWN + 4 - ABI_TID)
    except TargetError:
        return None, header
    tid, signature, fs_base, area, known = struct.unpack_from("<IIQQI", raw)
    if not tid or not fs_base or not os.path.exists(f"/proc/{process.pid}/task/{tid}"):
        return None, header
    return _ThreadSeen(tid, fs_base, area if known else None, signature if known else None), header


def _record_thread(process: Process, header: int | None, seen: _ThreadSeen) -> None:
    """Write what a seized thread showed into the resident header (ABI_*), tid last, so
    the next capture need not stop one (a failure only means it will)."""
    if header is None or not seen.fs_base:
        return
    try:
        process.write(header + ABI_RSEQ_SIG, struct.pack("<IQQI", seen.signature or 0, seen.fs_base,
                                                           seen.pointer or 0, int(seen.pointer is not None)))
        process.write(header + ABI_TID, struct.pack("<I", seen.tid))
    except TargetError:
        pass


def _seize_thread(process: Process, *, exclude: frozenset[int], held: BorrowedThread | None) -> _ThreadSeen:
    """Stop one thread for a moment (or use ``held``) and read what the ABI check needs."""
    tid = held.tid if held is not None else choose_thread(process, exclude=exclude, wait_s=0.5)
    with contextlib.nullcontext(held) if held is not None else BorrowedThread(process, tid) as thread:
        fs_base = thread.saved_regs.fs_base
        config = bytearray(struct.calcsize(_RSEQ_CONFIGURATION))
        try:
            _ptrace.ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, len(config), _ptrace.buffer_address(config))
            pointer, _, signature, _, _ = struct.unpack(_RSEQ_CONFIGURATION, config)
        except OSError:
            pointer = signature = None  # kernel without the request: trust glibc
    return _ThreadSeen(tid, fs_base, pointer, signature)


def probe_thread_abi(process: Process, *, exclude: frozenset[int] = frozenset(),
                     held: BorrowedThread | None = None) -> ThreadAbi:
    """Where the tid and the rseq area are, checked on one thread of ``process``.

    1. read glibc's ``__rseq_offset``/``__rseq_size`` from the live process;
    2. the thread: the one the resident part's install borrowed, as its stop
       showed it (recorded in the resident header; it must still live), so that
       nothing is stopped; else (an older or no resident part, that thread gone)
       seize one thread (not one in ``exclude``, e.g. textpoke's agent) for a
       moment, and record what it showed; or use ``held``, a thread we already
       hold stopped (spawn). Its ``fs_base``; the u32 at ``fs_base + 0x2d0`` must
       be its tid; ``PTRACE_GET_RSEQ_CONFIGURATION`` must show the rseq area at
       ``fs_base + __rseq_offset`` registered with glibc's signature;
    3. decide: rseq per-CPU buffers only if glibc registered rseq and the
       thread confirms it (or no thread could be checked: glibc's own
       registration always uses its signature); else every call takes the
       fallback path.
    """
    cpus = possible_cpus()
    rseq = _glibc_rseq(process)
    notes: list[str] = []
    if rseq is None or rseq[1] < RSEQ_CS + 8:
        notes.append("no glibc rseq registration")
        rseq = None
    tid_ok = False
    rseq_ok = rseq is not None
    try:
        seen, header = _recorded_thread(process) if held is None else (None, None)
        how = "recorded at install"
        if seen is None:
            seen = _seize_thread(process, exclude=exclude, held=held)
            how = "checked"
            if held is None:
                _record_thread(process, header, seen)
        tid, fs_base = seen.tid, seen.fs_base
        if fs_base:
            tid_ok = struct.unpack("<I", process.read(fs_base + GLIBC_TID_OFFSET, 4))[0] == tid
        notes.append(f"thread {tid} {how}: tid at fs:{GLIBC_TID_OFFSET:#x} {'yes' if tid_ok else 'no'}")
        if rseq is not None and seen.pointer is not None:
            rseq_ok = seen.pointer == fs_base + rseq[0] and seen.signature == RSEQ_SIG
            notes.append(f"rseq {'confirmed' if rseq_ok else 'not as glibc registers it'}")
    except (InjectionError, TargetError) as exc:
        notes.append(f"no thread could be checked ({exc.message}): opaque thread ids")
    return ThreadAbi(
        cpus=cpus if rseq_ok else 0,
        tid_offset=GLIBC_TID_OFFSET if tid_ok else None,
        rseq_offset=rseq[0] if rseq_ok and rseq is not None else None,
        note="; ".join(notes),
    )


# ---------------------------------------------------------------------------
# Code generation
# ---------------------------------------------------------------------------


def _save(a: Asm, regs: Sequence[int]) -> None:
    """Push what the routine borrows. (Copies in xmm8-12 instead, which fentry sites
    would allow, measured 1.5 ns slower per call here than the stack.)"""
    for reg in regs:
        a.op("PUSH_R64", reg)


def _restore(a: Asm, regs: Sequence[int]) -> None:
    for reg in reversed(regs):
        a.op("POP_R64", reg)


def _emit_tid(a: Asm, abi: ThreadAbi, dest32: int) -> None:
    """The thread id (zero-extended): glibc's tid, or the low half of the thread pointer."""
    a.op("MOV_R32_RM32", dest32, fs(TCB_SELF if abi.tid_offset is None else abi.tid_offset))


def _emit_rseq_enter(a: Asm, abi: ThreadAbi, descriptor: int, scratch: int, name: str) -> None:
    """Make sure this thread's ``rseq->rseq_cs`` points at ``descriptor`` (restart armed).

    The kernel clears the pointer only when it preempts or signals the thread
    outside a sequence, so it usually still points at our descriptor: a compare
    and a branch not taken save a store per call; the store is out of line, at
    ``<name>_arm`` (:func:`_emit_rseq_arm`), which continues at ``<name>_start``."""
    assert abi.rseq_offset is not None
    a.op("LEA_R64_M", scratch, mem(R.RIP, descriptor))
    a.op("CMP_RM64_R64", fs(abi.rseq_offset + RSEQ_CS), scratch)
    a.jump("JNE_REL32_64", f"{name}_arm")


def _emit_rseq_arm(a: Asm, abi: ThreadAbi, scratch: int, name: str) -> None:
    assert abi.rseq_offset is not None
    a.label(f"{name}_arm")
    a.op("MOV_RM64_R64", fs(abi.rseq_offset + RSEQ_CS), scratch)
    a.jump("JMP_REL32_64", f"{name}_start")


def _emit_abort(a: Asm, name: str, restart: str) -> None:
    """The abort handler: the signature in the 4 bytes before it, then restart."""
    a.data(struct.pack("<I", RSEQ_SIG))
    a.label(name)
    a.jump("JMP_REL32_64", restart)


def _emit_site_from_return(a: Asm, dest: int, return_at: int, stub_return: int, shift: int) -> None:
    """``dest`` = (return address at [rsp + return_at] - stub 0's) >> shift: the site id
    of a call stub (shift STUB_SHIFT), or id * 8 (shift STUB_SHIFT - 3)."""
    a.op("MOV_R64_RM64", dest, mem(R.RSP, return_at))
    a.op("SUB_R64_RM64", dest, mem(R.RIP, stub_return))
    a.op("SHR_RM64_IMM8", dest, shift)


class WordFrom(enum.Enum):
    """Where a record routine finds the tid/site word's site half."""

    R11 = "r11"  # r11 holds the site word << 32 (entry stubs, graph routines): one OR with the tid
    STUB = "stub"  # a call stub's return address on the stack gives the site id (call sites)


@dataclass(frozen=True)
class RecordShape:
    """What a record routine stores besides the timestamp (see :func:`_emit_record_body`).

    ``caller``: a register holding the caller word, or None to read it from the
    stack (``[rsp + pushed + 8]``: an fentry site's return address into its
    caller), or ``NO_CALLER`` (call sites: the site itself is the caller, known
    from its id, nothing stored). ``arg0``: the register stored as arg0."""

    word: WordFrom
    caller: int | None
    arg0: int = R.RDI


NO_CALLER = -1
ENTRY_SHAPE = RecordShape(WordFrom.R11, None)
CALL_SHAPE = RecordShape(WordFrom.STUB, NO_CALLER)


def _emit_enabled_check(a: Asm, *, enabled_constant: int, scratch: int, skip: str) -> None:
    """Jump to ``skip`` unless this session still records here: its flag page (private,
    wiped in a forked child by MADV_WIPEONFORK, cleared when the session ends) holds 1.
    A forked child thus never writes into its parent's ring or counters."""
    a.op("MOV_R64_RM64", scratch, mem(R.RIP, enabled_constant))
    a.op("CMP_RM8_IMM8", mem(scratch), 0)
    a.jump("JE_REL32_64", skip)


def _emit_record(a: Asm, *, name: str, shape: RecordShape, abi: ThreadAbi, ring: RingGeometry, blocks: int,
                 blocks_constant: int, stub_return: int, descriptor: int, enabled_constant: int) -> None:
    """``record_entry`` / ``record_call``: one record; every register the ABI keeps is kept.

    ``record_entry`` is reached from an fentry site's stub (``mov r11, id << 32;
    jmp record_entry``): [rsp] is site + 5, [rsp + 8] the traced function's
    return address into its caller (the caller word). ``record_call`` is
    called by a call site's stub (``call record_call; jmp callee``): [rsp] is
    stub + 5, which gives the site id; its caller is the site itself (known
    from the id), so no caller word is stored. Both store rdi as arg0. See
    :func:`_emit_record_body` for the steps."""
    cold: list[Callable[[], None]] = []
    a.label(name)
    _save(a, _RECORD_REGS)
    _emit_enabled_check(a, enabled_constant=enabled_constant, scratch=R.RAX, skip=f"{name}_post")
    _emit_record_body(a, name=name, shape=shape, abi=abi, ring=ring, blocks=blocks, blocks_constant=blocks_constant,
                      stub_return=stub_return, descriptor=descriptor, pushed=8 * len(_RECORD_REGS),
                      done=f"{name}_post", cold=cold)
    a.label(f"{name}_post")
    _restore(a, _RECORD_REGS)
    a.op("RETNQ")
    for emit in cold:
        emit()


def _emit_record_body(a: Asm, *, name: str, shape: RecordShape, abi: ThreadAbi, ring: RingGeometry, blocks: int,
                      blocks_constant: int, stub_return: int, descriptor: int, pushed: int, done: str,
                      cold: list[Callable[[], None]]) -> None:
    """Write one record and go on at ``done``, which the enclosing routine places right
    after this (the hot path falls through to it); the paths taken rarely (bell, full,
    rseq arm and abort, fallback) are appended to ``cold``, for the routine to emit
    after its ``ret``. The routine has saved rax, rcx, rdx, rsi (clobbered here) and
    pushed ``pushed`` bytes since it was entered.

    rseq path, steps (restartable from ``<name>_start`` up to the commit):
    1. ts = rdtsc; cpu = rseq->cpu_id; out of range (no rseq): fallback;
    2. full (head >= limit): leave the sequence for :func:`_emit_wait` (wait
       for the reader and start over, or count a loss);
    3. write the slot at head; 4. commit: store head + 32, the last
       instruction of the sequence; 5. after it, if the buffer just crossed a
       half, ring the reader's bell (:func:`_emit_bell`).
    Fallback: reserve a slot with ``lock cmpxchg`` after checking space (a
    full buffer never hands out a slot the reader would wait on), fill it,
    store the timestamp last as its commit word; full: as step 2.
    Registers other than rax, rcx, rdx, rsi are kept (the wait path too)."""
    mask = ring.bytes - 1
    fallback = blocks + ring.fallback * ring.stride

    def fill(slot: int, scratch: int, scratch32: int, return_at: int) -> None:
        """Step 3 without the timestamp: tid, site, caller word, arg0."""
        _emit_tid(a, abi, scratch32)
        if shape.word is WordFrom.R11:
            a.op("OR_R64_RM64", scratch, R.R11)  # r11 = site word << 32: tid and site, one store
            a.op("MOV_RM64_R64", mem(slot, SLOTS_OFFSET + SLOT_TID), scratch)
        else:
            a.op("MOV_RM32_R32", mem(slot, SLOTS_OFFSET + SLOT_TID), scratch32)
            _emit_site_from_return(a, scratch, return_at, stub_return, STUB_SHIFT)
            a.op("MOV_RM32_R32", mem(slot, SLOTS_OFFSET + SLOT_SITE), scratch32)
        if shape.caller is None:
            a.op("MOV_R64_RM64", scratch, mem(R.RSP, return_at + 8))
            a.op("MOV_RM64_R64", mem(slot, SLOTS_OFFSET + SLOT_CALLER), scratch)
        elif shape.caller != NO_CALLER:
            a.op("MOV_RM64_R64", mem(slot, SLOTS_OFFSET + SLOT_CALLER), shape.caller)
        a.op("MOV_RM64_R64", mem(slot, SLOTS_OFFSET + SLOT_ARG0), shape.arg0)

    a.label(f"{name}_enter")  # a writer that waited for the reader starts over here
    if abi.rseq_offset is not None:
        _emit_rseq_enter(a, abi, descriptor, R.RAX, name)
    a.label(f"{name}_start")
    a.op("RDTSC")
    a.op("SHL_RM64_IMM8", R.RDX, 32)
    a.op("OR_RM64_R64", R.RAX, R.RDX)
    if abi.rseq_offset is not None:
        a.op("MOV_R32_RM32", R.ECX, fs(abi.rseq_offset + RSEQ_CPU_ID))
        a.op("CMP_RM32_IMM32", R.ECX, ring.cpus)
        a.jump("JAE_REL32_64", f"{name}_fallback")  # unsigned: also cpu_id -1/-2 (unregistered)
        a.op("IMUL_R32_RM32_IMM32", R.ECX, R.ECX, ring.stride)
        a.op("ADD_R64_RM64", R.RCX, mem(R.RIP, blocks_constant))  # rcx = this CPU's block
        a.op("MOV_R64_RM64", R.RDX, mem(R.RCX, CTL_HEAD))
        a.op("CMP_R64_RM64", R.RDX, mem(R.RCX, CTL_LIMIT))
        a.jump("JAE_REL32_64", f"{name}_full")
        a.op("MOV_R32_RM32", R.ESI, R.EDX)
        a.op("AND_RM32_IMM32", R.ESI, mask)
        a.op("ADD_R64_RM64", R.RSI, R.RCX)  # the slot is at rsi + SLOTS_OFFSET
        # Own a line ahead before it is written: the reader has usually read it (it
        # is shared in that CPU's cache), and a store waiting for it holds rdtsc
        # back (measured: 0.7 ns per call).
        a.op("PREFETCHW_M8", mem(R.RSI, SLOTS_OFFSET + PREFETCH_AHEAD))
        a.op("MOV_RM64_R64", mem(R.RSI, SLOTS_OFFSET + SLOT_TS), R.RAX)
        fill(R.RSI, R.RAX, R.EAX, pushed)
        # The new head from a register: a read-modify-write of head in memory
        # would chain each record to the previous one through two store forwards.
        a.op("ADD_RM64_IMM8", R.RDX, SLOT_SIZE)
        a.label(f"{name}_commit")
        a.op("MOV_RM64_R64", mem(R.RCX, CTL_HEAD), R.RDX)
        # Step 5, after the sequence: the buffer crossed a half of its slots (the new
        # head is a multiple of half of them): ring the reader's bell, out of line.
        a.op("TEST_RM32_IMM32", R.EDX, ring.bytes // 2 - 1)
        a.jump("JE_REL32_64", f"{name}_bell")
    else:
        a.jump("JMP_REL32_64", f"{name}_fallback")
    cold.append(lambda: _emit_record_cold(a, name=name, fill=fill, abi=abi, ring=ring, fallback=fallback,
                                          mask=mask, pushed=pushed, done=done))


def _emit_record_cold(a: Asm, *, name: str, fill: Callable[[int, int, int, int], None], abi: ThreadAbi,
                      ring: RingGeometry, fallback: int, mask: int, pushed: int, done: str) -> None:
    """The rare paths of :func:`_emit_record_body`: the bell, a full buffer, the rseq
    arm and abort handler, the fallback buffer."""
    a.label(f"{name}_bell")
    a.jump("CALL_REL32_64", "ring_bell")
    a.jump("JMP_REL32_64", done)
    # Full (rcx = the buffer's block): wait for the reader and start over, or, when
    # wait_for_reader gives up (drop mode, reader gone or stalled), count the loss
    # (``lock inc``: exact even if we migrated meanwhile).
    a.label(f"{name}_full")
    a.jump("CALL_REL32_64", "wait_for_reader")
    a.op("TEST_RM32_R32", R.EAX, R.EAX)
    a.jump("JE_REL32_64", f"{name}_enter")
    a.op("INC_RM64", mem(R.RCX, CTL_LOST), lock=True)
    a.jump("JMP_REL32_64", done)
    if abi.rseq_offset is not None:
        _emit_rseq_arm(a, abi, R.RAX, name)
        _emit_abort(a, f"{name}_abort", f"{name}_start")

    a.label(f"{name}_fallback")
    a.op("PUSH_R64", R.RAX)  # ts: rax becomes cmpxchg's comparand
    a.op("MOV_R64_IMM64", R.RCX, Imm64(fallback))  # data lives apart from the code (map_shared)
    a.op("MOV_R64_RM64", R.RAX, mem(R.RCX, CTL_HEAD))
    a.label(f"{name}_reserve")
    a.op("CMP_R64_RM64", R.RAX, mem(R.RCX, CTL_LIMIT))
    a.jump("JAE_REL32_64", f"{name}_fallback_full")
    a.op("LEA_R64_M", R.RDX, mem(R.RAX, SLOT_SIZE))
    a.op("CMPXCHG_RM64_R64", mem(R.RCX, CTL_HEAD), R.RDX, lock=True)
    a.jump("JNE_REL32_64", f"{name}_reserve")  # rax = the head another thread took; again
    a.op("AND_RM32_IMM32", R.EAX, mask)
    a.op("ADD_R64_RM64", R.RAX, R.RCX)  # the slot is at rax + SLOTS_OFFSET
    fill(R.RAX, R.RDX, R.EDX, pushed + 8)
    a.op("POP_R64", R.RDX)
    a.op("MOV_RM64_R64", mem(R.RAX, SLOTS_OFFSET + SLOT_TS), R.RDX)  # commit word: stores stay in order
    a.jump("JMP_REL32_64", done)
    a.label(f"{name}_fallback_full")
    a.op("POP_R64", R.RDX)
    a.jump("JMP_REL32_64", f"{name}_full")


def _emit_bell(a: Asm, *, header_constant: int) -> None:
    """``ring_bell``: wake the reader if it sleeps (called by the record routines).

    Bump ``HDR_BELL`` (``lock inc``: the reader compares it with what it saw before
    it went to sleep, so a bell rung while it was falling asleep is never missed,
    see RingReader.sleep), then, only if ``HDR_SLEEPING`` is set, clear it with
    ``lock btr`` and, if this thread was the one that cleared it, ``futex_wake``
    the bell: one syscall per sleep of the reader, whatever the number of writers.
    Clobbers rax, rcx, rdx, rsi (saved by the routines); keeps every other register."""
    a.label("ring_bell")
    a.op("MOV_R64_RM64", R.RSI, mem(R.RIP, header_constant))
    a.op("INC_RM32", mem(R.RSI, HDR_BELL), lock=True)
    a.op("CMP_RM32_IMM8", mem(R.RSI, HDR_SLEEPING), 0)
    a.jump("JE_REL32_64", "ring_bell_done")
    a.op("BTR_RM32_IMM8", mem(R.RSI, HDR_SLEEPING), 0, lock=True)
    a.jump("JAE_REL32_64", "ring_bell_done")  # CF clear: another writer woke it
    a.op("PUSH_R64", R.RDI)
    a.op("PUSH_R64", R.R11)  # syscall clobbers rcx and r11
    a.op("LEA_R64_M", R.RDI, mem(R.RSI, HDR_BELL))
    a.op("MOV_R32_IMM32", R.ESI, FUTEX_WAKE)
    a.op("MOV_R32_IMM32", R.EDX, 1)
    a.op("MOV_R32_IMM32", R.EAX, SYS_futex)
    a.op("SYSCALL")
    a.op("POP_R64", R.R11)
    a.op("POP_R64", R.RDI)
    a.label("ring_bell_done")
    a.op("RETNQ")


def _emit_wait(a: Asm, *, header_constant: int, slice_constant: int) -> None:
    """``wait_for_reader``: a writer found its buffer full (rcx = its block).

    Returns eax = 0 when it waited (the routine starts over: the buffer, the CPU,
    everything is looked at again), 1 when it must not wait (the routine counts a
    loss). Steps:

    1. ring the bell (the reader may sleep; a full buffer is news);
    2. ``rdtsc`` >= ``HDR_DEADLINE``: give up (drop mode stores 0 there; a reader that
       stopped pushing the deadline ahead is stalled or gone);
    3. ``kill(HDR_READER_PID, 0)`` is -ESRCH: the reader is dead; store deadline 0 so
       every other writer gives up at once, and give up;
    4. ``lock inc`` the block's waiter count, then look at the limit again (the
       reader may have moved it before it could see us) and, if still full, sleep on
       the limit word's low half (a shared futex: the reader's view is another
       mapping of the same memfd) for one WAIT_SLICE_NS at most; ``lock dec``.
    Every wait ends by a wake, the slice's end or a signal, and the caller looks
    again, so no writer waits past the deadline by more than a slice, and none at
    all once the reader is gone. Keeps every register but rax, rdx, rsi (saved by the
    routines) and flags."""
    a.label("wait_for_reader")
    for reg in (R.RCX, R.RDI, R.R8, R.R9, R.R10, R.R11):
        a.op("PUSH_R64", reg)
    a.op("MOV_R64_RM64", R.R8, R.RCX)  # the kernel keeps r8 across a syscall
    a.jump("CALL_REL32_64", "ring_bell")
    a.op("MOV_R64_RM64", R.RSI, mem(R.RIP, header_constant))
    a.op("RDTSC")
    a.op("SHL_RM64_IMM8", R.RDX, 32)
    a.op("OR_RM64_R64", R.RAX, R.RDX)
    a.op("CMP_R64_RM64", R.RAX, mem(R.RSI, HDR_DEADLINE))
    a.jump("JAE_REL32_64", "wait_give_up")
    a.op("MOV_R32_RM32", R.EDI, mem(R.RSI, HDR_READER_PID))
    a.op("TEST_RM32_R32", R.EDI, R.EDI)
    a.jump("JE_REL32_64", "wait_sleep")
    a.op("XOR_R32_RM32", R.ESI, R.ESI)  # signal 0: only "does it exist"
    a.op("MOV_R32_IMM32", R.EAX, SYS_kill)
    a.op("SYSCALL")
    a.op("CMP_RM64_IMM8", R.RAX, -ESRCH)
    a.jump("JNE_REL32_64", "wait_sleep")
    a.op("MOV_R64_RM64", R.RSI, mem(R.RIP, header_constant))
    a.op("MOV_RM64_IMM32", mem(R.RSI, HDR_DEADLINE), 0)
    a.jump("JMP_REL32_64", "wait_give_up")
    a.label("wait_sleep")
    a.op("INC_RM32", mem(R.R8, CTL_WAITERS), lock=True)
    a.op("MOV_R64_RM64", R.RDX, mem(R.R8, CTL_LIMIT))  # edx: the futex's expected value
    a.op("CMP_RM64_R64", mem(R.R8, CTL_HEAD), R.RDX)
    a.jump("JB_REL32_64", "wait_woken")  # room already: the reader was quicker
    a.op("LEA_R64_M", R.RDI, mem(R.R8, CTL_LIMIT))
    a.op("MOV_R32_IMM32", R.ESI, FUTEX_WAIT)
    a.op("LEA_R64_M", R.R10, mem(R.RIP, slice_constant))
    a.op("MOV_R32_IMM32", R.EAX, SYS_futex)
    a.op("SYSCALL")
    a.label("wait_woken")
    a.op("DEC_RM32", mem(R.R8, CTL_WAITERS), lock=True)
    a.op("XOR_R32_RM32", R.EAX, R.EAX)
    a.jump("JMP_REL32_64", "wait_done")
    a.label("wait_give_up")
    a.op("MOV_R32_IMM32", R.EAX, 1)
    a.label("wait_done")
    for reg in (R.R11, R.R10, R.R9, R.R8, R.RDI, R.RCX):
        a.op("POP_R64", reg)
    a.op("RETNQ")


def _emit_count(a: Asm, *, name: str, entry: bool, abi: ThreadAbi, counters: CounterGeometry, rows: int,
                stub_return: int, descriptor: int, enabled_constant: int) -> None:
    """``count_entry`` / ``count_call``: this CPU's counter of the site plus one.

    The entry stub passes the site's counter in row 0 in r11 (``mov r11,
    imm64; jmp count_entry``); the call stub (``call count_call; jmp callee``)
    passes nothing and the id comes from its return address, so r11 is kept.
    rseq path: arm the sequence, read cpu_id, ``inc`` the counter in this
    CPU's row (the commit, a single instruction: it happened or the sequence
    restarts). Fallback: ``lock inc`` on the shared row."""
    regs = (R.RAX,) if entry else (R.RAX, R.RCX)
    counter = R.R11 if entry else R.RCX  # this site's counter in row 0
    a.label(name)
    _save(a, regs)
    _emit_enabled_check(a, enabled_constant=enabled_constant, scratch=R.RAX, skip=f"{name}_post")
    if not entry:
        _emit_site_from_return(a, R.RCX, 8 * len(regs), stub_return, STUB_SHIFT - 3)
        a.op("MOV_R64_IMM64", R.RAX, Imm64(rows))
        a.op("ADD_R64_RM64", R.RCX, R.RAX)
    if abi.rseq_offset is not None:
        _emit_rseq_enter(a, abi, descriptor, R.RAX, name)
        a.label(f"{name}_start")
        a.op("MOV_R32_RM32", R.EAX, fs(abi.rseq_offset + RSEQ_CPU_ID))
        a.op("CMP_RM32_IMM32", R.EAX, counters.cpus)
        a.jump("JAE_REL32_64", f"{name}_fallback")
        a.op("SHL_RM32_IMM8", R.EAX, counters.row_bytes.bit_length() - 1)
        a.label(f"{name}_commit")
        a.op("INC_RM64", mem(counter, index=R.RAX))
    else:
        a.jump("JMP_REL32_64", f"{name}_fallback")
    a.label(f"{name}_post")
    _restore(a, regs)
    a.op("RETNQ")
    if abi.rseq_offset is not None:
        _emit_rseq_arm(a, abi, R.RAX, name)
        _emit_abort(a, f"{name}_abort", f"{name}_start")
    a.label(f"{name}_fallback")
    a.op("INC_RM64", mem(counter, counters.cpus * counters.row_bytes), lock=True)
    a.jump("JMP_REL32_64", f"{name}_post")


def _instruction_end(code: bytes, base: int, address: int) -> int:
    decoder = Decoder(64, code[address - base :], ip=address)
    return decoder.decode().next_ip


#: Per mode: the routine for entry sites and the one for call sites (descriptors 0 and 1).
_ROUTINE_NAMES = {Mode.TRACE: ("record_entry", "record_call"), Mode.COUNT: ("count_entry", "count_call")}


def _entry_stub_template() -> tuple[bytes, int, int]:
    """An entry stub's ``mov r11, imm64`` assembled once: (bytes, immediate offset, size).

    The immediate is the site id in the high half for record_entry (which ORs
    the tid into it: one store for both), the address of the site's counter in
    row 0 for count_entry."""
    a = Asm()
    a.op("MOV_R64_IMM64", R.R11, Imm64(0x7FFF_FFFF_0000_0000))
    code, _ = a.assemble(0)
    decoder = Decoder(64, code)
    offsets = decoder.get_constant_offsets(decoder.decode())
    return code, offsets.immediate_offset, offsets.immediate_size


def _emit_shadow_lookup(a: Asm, *, base: int, shift: int, entry: int, scratch: int, miss: str) -> None:
    """The fast path of the runtime's ``shadow_slot``, inline: rax = the thread pointer
    (fs:0); ``entry`` = its table entry if the first probe finds it, else a jump to
    ``miss`` (which calls shadow_slot: rax still holds the thread pointer)."""
    a.op("MOV_R64_RM64", R.RAX, fs(TCB_SELF))
    a.op("MOV_R64_RM64", entry, R.RAX)
    a.op("IMUL_R64_RM64", entry, mem(R.RIP, base + _G_HASH))
    a.op("SHR_RM64_IMM8", entry, shift)
    a.op("SHL_RM64_IMM8", entry, 4)
    a.op("ADD_R64_RM64", entry, mem(R.RIP, base + _G_TABLE))
    a.op("CMP_RM64_R64", mem(entry, graph.E_TP), R.RAX)
    a.jump("JNE_REL32_64", miss)


def _emit_graph_entry(a: Asm, *, abi: ThreadAbi, ring: RingGeometry, blocks: int, base: int, descriptor: int,
                      geometry: graph.ShadowGeometry) -> None:
    """``graph_entry``: an fentry site's entry, recorded and, where it can be, hooked.

    Reached like ``record_entry`` (``mov r11, id << 32; jmp graph_entry``: [rsp]
    is site + 5, [rsp + 8] the function's return address, its slot S). Steps:

    1. this thread's shadow entry (r8; the runtime's ``shadow_slot``, its first
       probe inline) and its first frame (r10); the caller word (r9) is the return
       address, or, where a hooked function tail-called this one (S holds the
       trampoline already), the real one from that function's frame (the top
       frame, whose slot is S);
    2. a frame on top at or below S is gone (a longjmp left it): the runtime's
       ``graph_unwound`` reports it first;
    3. room in the table and on the shadow stack: the record is an ENTER; else a
       CALL (entry only, counted in the ring header);
    4. the record (:func:`_emit_record_body`);
    5. an ENTER is hooked: reserve the frame (depth + 1), write its return
       address, site word (with the thread, see graph_exit), exit routine and,
       last, its slot; then put the trampoline in S. A signal handler running in
       between pushes above it.
    """
    regs = (R.RAX, R.RCX, R.RDX, R.RSI, R.R8, R.R9, R.R10)
    slot_at = 8 * len(regs) + 8
    name = "graph_entry"
    depth = geometry.depth
    cold: list[Callable[[], None]] = []

    a.label(name)
    _save(a, regs)
    _emit_enabled_check(a, enabled_constant=base + _CONST_ENABLED, scratch=R.RAX, skip=f"{name}_post")
    _emit_shadow_lookup(a, base=base, shift=geometry.shift, entry=R.R8, scratch=R.RCX, miss=f"{name}_slow_slot")
    a.label(f"{name}_slot")
    # r10 = the entry's first frame (table-relative: the entry's index times the stack size).
    a.op("MOV_R64_RM64", R.R10, R.R8)
    a.op("SUB_R64_RM64", R.R10, mem(R.RIP, base + _G_TABLE))
    a.op("IMUL_R64_RM64_IMM32", R.R10, R.R10, depth * graph.FRAME_SIZE // graph.ENTRY_SIZE)
    a.op("ADD_R64_RM64", R.R10, mem(R.RIP, base + _G_FRAMES))
    a.op("MOV_R64_RM64", R.R9, mem(R.RSP, slot_at))
    a.op("LEA_R64_M", R.RSI, mem(R.RSP, slot_at))
    a.op("MOV_R32_RM32", R.EDX, mem(R.R8, graph.E_DEPTH))
    a.op("SUB_RM32_IMM8", R.EDX, 1)
    a.jump("JS_REL32_64", f"{name}_checked")  # nothing on the stack
    a.op("SHL_RM64_IMM8", R.RDX, 5)
    a.op("CMP_RM64_R64", mem(R.R10, index=R.RDX, displ=graph.F_SLOT), R.RSI)
    a.jump("JBE_REL32_64", f"{name}_top_at_or_below")  # rare: a tail call, or a frame left by longjmp
    a.label(f"{name}_checked")
    a.op("CMP_RM32_IMM32", mem(R.R8, graph.E_DEPTH), depth)
    a.jump("JAE_REL32_64", f"{name}_no_depth")
    a.op("BTS_RM64_IMM8", R.R11, graph.KIND_LO_BIT)  # kind ENTER
    a.op("BTS_RM64_IMM8", R.R11, graph.KIND_HI_BIT)
    _emit_record_body(a, name=name, shape=RecordShape(WordFrom.R11, R.R9, R.RDI), abi=abi, ring=ring,
                      blocks=blocks, blocks_constant=base + _CONST_BLOCKS, stub_return=base + _CONST_STUB_RETURN,
                      descriptor=descriptor, pushed=8 * len(regs), done=f"{name}_recorded", cold=cold)
    a.label(f"{name}_recorded")
    a.op("BT_RM64_IMM8", R.R11, graph.KIND_HI_BIT)
    a.jump("JAE_REL32_64", f"{name}_post")  # recorded as a CALL: not hooked
    a.op("MOV_R32_RM32", R.EDX, mem(R.R8, graph.E_DEPTH))
    a.op("CMP_RM32_IMM32", R.EDX, depth)
    a.jump("JAE_REL32_64", f"{name}_post")
    a.op("LEA_R32_M", R.EAX, mem(R.RDX, 1))
    a.op("MOV_RM32_R32", mem(R.R8, graph.E_DEPTH), R.EAX)  # reserve
    a.op("SHL_RM64_IMM8", R.RDX, 5)
    a.op("ADD_R64_RM64", R.RDX, R.R10)  # the frame
    a.op("MOV_R64_RM64", R.RAX, mem(R.RSP, slot_at))
    a.op("MOV_RM64_R64", mem(R.RDX, graph.F_RET), R.RAX)
    _emit_tid(a, abi, R.EAX)  # the frame's thread, beside its site word (see graph_exit)
    a.op("OR_R64_RM64", R.RAX, R.R11)
    a.op("MOV_RM64_R64", mem(R.RDX, graph.F_SITE), R.RAX)
    a.op("MOV_R64_RM64", R.RAX, mem(R.RIP, base + _G_EXIT))
    a.op("MOV_RM64_R64", mem(R.RDX, graph.F_EXIT), R.RAX)
    a.op("LEA_R64_M", R.RAX, mem(R.RSP, slot_at))
    a.op("MOV_RM64_R64", mem(R.RDX, graph.F_SLOT), R.RAX)  # the key, last
    a.op("MOV_R64_RM64", R.RAX, mem(R.RIP, base + _G_RETURN))
    a.op("MOV_RM64_R64", mem(R.RSP, slot_at), R.RAX)  # hooked
    a.label(f"{name}_post")
    _restore(a, regs)
    a.op("RETNQ")

    # -- the rare paths --
    a.label(f"{name}_slow_slot")
    a.op("CALL_RM64", mem(R.RIP, base + _G_SLOT))  # r8 = this thread's entry, or 0
    a.op("TEST_RM64_R64", R.R8, R.R8)
    a.jump("JNE_REL32_64", f"{name}_slot")
    a.op("MOV_R64_RM64", R.R9, mem(R.RSP, slot_at))  # no entry: no hook, no frames to look at
    a.op("MOV_R64_RM64", R.RAX, mem(R.RIP, base + _CONST_HEADER))
    a.op("INC_RM64", mem(R.RAX, HDR_SHADOW_NO_THREAD), lock=True)
    a.jump("JMP_REL32_64", f"{name}_enter")
    a.label(f"{name}_top_at_or_below")  # rdx = the top frame's offset from r10, rsi = S
    a.jump("JB_REL32_64", f"{name}_gone")
    a.op("CMP_R64_RM64", R.R9, mem(R.RIP, base + _G_RETURN))
    a.jump("JNE_REL32_64", f"{name}_gone")
    # A tail call from the hooked function whose frame is on top: its caller is ours.
    a.op("MOV_R64_RM64", R.R9, mem(R.R10, index=R.RDX, displ=graph.F_RET))
    a.jump("JMP_REL32_64", f"{name}_checked")
    a.label(f"{name}_gone")
    a.op("CALL_RM64", mem(R.RIP, base + _G_UNWOUND))
    a.jump("JMP_REL32_64", f"{name}_checked")
    a.label(f"{name}_no_depth")
    a.op("MOV_R64_RM64", R.RAX, mem(R.RIP, base + _CONST_HEADER))
    a.op("INC_RM64", mem(R.RAX, HDR_SHADOW_FULL), lock=True)
    a.jump("JMP_REL32_64", f"{name}_enter")
    for emit in cold:
        emit()


def _emit_graph_exit(a: Asm, *, abi: ThreadAbi, ring: RingGeometry, blocks: int, base: int,
                     descriptor: int) -> None:
    """``graph_exit``: the runtime pops a frame of this session's (graph.py): r11 = the
    frame's site word << 32 with the kind set (EXIT, UNWOUND) | the thread that pushed
    it, r9 = its return address (the caller word), r10 = arg0 (the return value).

    A frame of another thread (a thread that died in it; its thread pointer, and so its
    shadow stack, reused by a new one) is left unrecorded: its thread's records end
    there. Then as ``record_entry``; keeps every register."""
    name = "graph_exit"
    cold: list[Callable[[], None]] = []
    a.label(name)
    _save(a, _RECORD_REGS)
    _emit_enabled_check(a, enabled_constant=base + _CONST_ENABLED, scratch=R.RAX, skip=f"{name}_post")
    _emit_tid(a, abi, R.EAX)
    a.op("CMP_R32_RM32", R.EAX, R.R11D)
    a.jump("JNE_REL32_64", f"{name}_post")
    _emit_record_body(a, name=name, shape=RecordShape(WordFrom.R11, R.R9, R.R10), abi=abi, ring=ring,
                      blocks=blocks, blocks_constant=base + _CONST_BLOCKS, stub_return=base + _CONST_STUB_RETURN,
                      descriptor=descriptor, pushed=8 * len(_RECORD_REGS), done=f"{name}_post", cold=cold)
    a.label(f"{name}_post")
    _restore(a, _RECORD_REGS)
    a.op("RETNQ")
    for emit in cold:
        emit()


def generate(
    *,
    base: int,
    data: int,
    mode: Mode,
    abi: ThreadAbi,
    sites: Sequence[TracedSite],
    ring: RingGeometry | None = None,
    counters: CounterGeometry | None = None,
    enabled: int,
    runtime: graph.GraphRuntime | None = None,
    columns: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[bytes, dict[str, int]]:
    """The code region for ``sites`` placed at ``base``, data at ``data``: (bytes, labels).
    (``columns``: :func:`_site_columns` of ``sites``, if the caller has them.)

    Layout: rseq descriptors at offset 0 (one per routine with a sequence),
    constants at 128 (block 0's address; stub 0 + 5; the wait slice; the ring
    header; the flag page; the graph runtime's addresses), the routines from
    256, then one 16-byte stub per site from offset PAGE (stub i at
    ``labels["stubs"] + 16 i``):

    - fentry site: ``mov r11, id << 32; jmp record_entry`` (trace), ``jmp
      graph_entry`` (trace with a graph ``runtime``: entries and exits), or
      ``mov r11, &counter[0][id]; jmp count_entry`` (count);
    - call site: ``call record_call; jmp callee`` (or ``count_call``); the
      routine finds the id from the return address, stub i + 5;
    - hook site (graph): ``call [graph_rehook or graph_restore]; jmp callee``.
    """
    a = Asm()
    code = bytearray(INT3 * (_STUBS + len(sites) * STUB_SIZE))
    entry_name, call_name = _ROUTINE_NAMES[mode]
    stub_return = base + _CONST_STUB_RETURN
    enabled_constant = base + _CONST_ENABLED
    sequences = [entry_name, call_name]
    if mode is Mode.TRACE:
        _emit_bell(a, header_constant=base + _CONST_HEADER)
        _emit_wait(a, header_constant=base + _CONST_HEADER, slice_constant=base + _CONST_WAIT_SLICE)
    for name, entry, slot in ((entry_name, True, 0), (call_name, False, 1)):
        descriptor = base + _DESCRIPTORS + RSEQ_CS_SIZE * slot
        if mode is Mode.TRACE:
            assert ring is not None
            zero = data + ring.blocks_offset
            _emit_record(a, name=name, shape=ENTRY_SHAPE if entry else CALL_SHAPE, abi=abi, ring=ring, blocks=zero,
                         blocks_constant=base + _CONST_BLOCKS, stub_return=stub_return, descriptor=descriptor,
                         enabled_constant=enabled_constant)
        else:
            assert counters is not None
            zero = data + counters.rows_offset
            _emit_count(a, name=name, entry=entry, abi=abi, counters=counters, rows=zero,
                        stub_return=stub_return, descriptor=descriptor, enabled_constant=enabled_constant)
    if runtime is not None:
        if mode is not Mode.TRACE or ring is None:
            raise UsageError("function-graph tracing records; it does not count")
        _emit_graph_entry(a, abi=abi, ring=ring, blocks=zero, base=base,
                          descriptor=base + _DESCRIPTORS + RSEQ_CS_SIZE * 2, geometry=runtime.geometry)
        _emit_graph_exit(a, abi=abi, ring=ring, blocks=zero, base=base,
                         descriptor=base + _DESCRIPTORS + RSEQ_CS_SIZE * 3)
        sequences += ["graph_entry", "graph_exit"]
    struct.pack_into("<QQ", code, _CONST_BLOCKS, zero, base + _STUBS + CALL_SIZE)
    struct.pack_into("<qqQQ", code, _CONST_WAIT_SLICE, 0, WAIT_SLICE_NS, data, enabled)
    routine_code, labels = a.assemble(base + _ROUTINES)
    if _ROUTINES + len(routine_code) > _STUBS:
        raise InjectionError(f"tracer routines are {len(routine_code)} bytes, more than {_STUBS - _ROUTINES}")
    code[_ROUTINES : _ROUTINES + len(routine_code)] = routine_code
    if runtime is not None:
        shadow = runtime.geometry
        struct.pack_into("<10Q", code, _CONST_GRAPH, runtime.shadow_slot, runtime.shadow + shadow.table_offset,
                         runtime.shadow + shadow.frames_offset, runtime.graph_return, runtime.counters,
                         runtime.graph_restore, runtime.graph_rehook, labels["graph_exit"], runtime.graph_unwound,
                         graph.HASH_K)
    # Every descriptor slot holds a valid descriptor, used or not: a thread's rseq_cs may
    # still name a slot an earlier session of this (reused) region used. An unused one
    # covers no instruction (post_commit_offset 0) and names real addresses (the kernel
    # may refuse a descriptor of zeros: SIGSEGV).
    neutral = base + _ROUTINES
    for slot in range(_DESCRIPTOR_SLOTS):
        struct.pack_into(_RSEQ_CS_FORMAT, code, _DESCRIPTORS + RSEQ_CS_SIZE * slot, 0, 0, neutral, 0, neutral)
    if abi.rseq_offset is not None:
        for slot, name in enumerate(sequences):
            start = labels[f"{name}_start"]
            end = _instruction_end(bytes(code), base, labels[f"{name}_commit"])
            struct.pack_into(_RSEQ_CS_FORMAT, code, _DESCRIPTORS + RSEQ_CS_SIZE * slot,
                             0, 0, start, end - start, labels[f"{name}_abort"])

    entry_target = labels["graph_entry" if runtime is not None else entry_name]
    _write_stubs(code, base=base, sites=sites, mode=mode, zero=zero, entry_target=entry_target,
                 call_routine=labels[call_name], graph_hooks=runtime is not None, columns=columns)
    labels["stubs"] = base + _STUBS
    return bytes(code), labels


_SITE_FIELDS = operator.attrgetter("address", "kind", "original")


def _site_columns(sites: Sequence[TracedSite]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Addresses (u64), kinds (index into StubKind), original instructions ((N, 5) u8) of ``sites``."""
    count = len(sites)
    if not count:
        return np.zeros(0, np.uint64), np.zeros(0, np.int8), np.zeros((0, CALL_SIZE), np.uint8)
    addresses, kinds, originals = zip(*map(_SITE_FIELDS, sites))
    # Kinds compared as objects, all at once (an enum's hash is Python code: 20,000 of them cost ms).
    objects = np.array(kinds, dtype=object)
    kind = np.zeros(count, dtype=np.int8)
    for k, member in enumerate(StubKind):
        kind[objects == member] = k
    original = np.frombuffer(b"".join(originals), dtype=np.uint8).reshape(count, CALL_SIZE)
    return np.array(addresses, dtype=np.uint64), kind, original


def _write_stubs(code: bytearray, *, base: int, sites: Sequence[TracedSite], mode: Mode, zero: int,
                 entry_target: int, call_routine: int, graph_hooks: bool,
                 columns: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
    """Stub i of every site at ``_STUBS + STUB_SIZE * i`` (see generate), written for all
    sites at once (entry and call stubs are two encodings with per-site fields; the few
    hook stubs one at a time):

    - entry: the ``mov r11, imm64`` template with its immediate, then ``jmp`` the routine;
    - call: ``call`` the routine, then ``jmp`` the callee."""
    count = len(sites)
    if not count:
        return
    addresses, kind, original = columns if columns is not None else _site_columns(sites)
    stubs = np.uint64(base + _STUBS) + np.arange(count, dtype=np.uint64) * np.uint64(STUB_SIZE)
    area = np.frombuffer(code, dtype=np.uint8, count=count * STUB_SIZE, offset=_STUBS).reshape(count, STUB_SIZE)
    entry = kind == list(StubKind).index(StubKind.ENTRY)
    if entry.any():
        template, imm_at, imm_size = _entry_stub_template()
        index = np.flatnonzero(entry).astype(np.uint64)
        values = index << np.uint64(32) if mode is Mode.TRACE else np.uint64(zero) + np.uint64(8) * index
        rows = np.empty((len(index), len(template) + CALL_SIZE), dtype=np.uint8)
        rows[:, : len(template)] = np.frombuffer(template, dtype=np.uint8)
        rows[:, imm_at : imm_at + imm_size] = values.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :imm_size]
        jumps = stubs[entry] + np.uint64(len(template))
        rows[:, len(template) :] = encode_jmps(jumps, np.full(len(index), entry_target, dtype=np.uint64))
        area[entry, : rows.shape[1]] = rows
    call = kind == list(StubKind).index(StubKind.CALL)
    if call.any():
        callees = rel32_targets(addresses[call], original[call])
        area[call, :CALL_SIZE] = encode_calls(stubs[call], np.full(int(call.sum()), call_routine, dtype=np.uint64))
        area[call, CALL_SIZE : 2 * CALL_SIZE] = encode_jmps(stubs[call] + np.uint64(CALL_SIZE), callees)
    for i in np.flatnonzero(~(entry | call)).tolist():
        site = sites[i]
        callee = site.callee
        assert callee is not None and graph_hooks
        stub = int(stubs[i])
        hook = Asm()
        hook.op("CALL_RM64", mem(R.RIP, base + (_G_REHOOK if site.kind is StubKind.REHOOK else _G_RESTORE)))
        body = bytearray(hook.assemble(stub)[0])
        body += encode_jmp(stub + len(body), callee)
        area[i, : len(body)] = np.frombuffer(body, dtype=np.uint8)


# ---------------------------------------------------------------------------
# The tracer in a target
# ---------------------------------------------------------------------------


def _region_guards(runtime: graph.GraphRuntime | None, process: Process) -> tuple[
        Callable[[int, int], bool] | None, tuple[range, ...]]:
    """What keeps a released region from being reused besides sites and threads in it
    (``map_shared(still_used=, via=)``), from the process's graph runtime, if any (an
    earlier session's, a killed one's too):

    - a frame hooked by an earlier session still returns through an exit routine in
      [start, end): the runtime calls that routine whenever the frame returns;
    - a thread in the runtime's code may be about to call one (having popped the frame
      that named it, it is seen outside the region and no frame names it)."""
    if runtime is None:
        return None, ()
    found = runtime

    def still_used(start: int, end: int) -> bool:
        return found.frames_returning_to(process, range(start, end)) > 0

    return still_used, (found.code,)


class Tracer:
    """Trampolines for ``sites`` and the shared memory they write; a context manager.

    Construction maps one memfd: its code near the sites (RX in the target),
    its data apart (RW in both; see Resident.map_shared), and writes code and
    control blocks; it patches nothing:
    :attr:`patches` is the batch that sends every site to its routine or stub
    (apply it with ``Session.apply``, revert with ``Session.revert``). The
    region is never unmapped in the target (a thread may still be inside a
    routine, and a thread's rseq_cs may still point at its descriptor);
    :meth:`close` releases the tool's view and, with ``discard=True``, the
    record pages' memory.
    """

    def __init__(self, resident: Resident, sites: Sequence[TracedSite], *, mode: Mode, abi: ThreadAbi,
                 ring_records: int = DEFAULT_RING_RECORDS, name: str = "textpoke-trace",
                 runtime: graph.GraphRuntime | None = None) -> None:
        if not sites:
            raise UsageError("no sites to trace")
        if runtime is None and any(s.kind in (StubKind.REHOOK, StubKind.RESTORE) for s in sites):
            raise UsageError("hook sites need a graph runtime")
        self.mode = mode
        self.runtime = runtime
        self.abi = abi
        self.sites = tuple(sites)
        self.ring: RingGeometry | None = None
        self.counters: CounterGeometry | None = None
        if mode is Mode.TRACE:
            self.ring = RingGeometry.for_records(ring_records, cpus=abi.cpus)
            data_size = self.ring.size
        else:
            self.counters = CounterGeometry(cpus=abi.cpus, sites=len(self.sites))
            data_size = self.counters.size
        # Whole powers of two of pages: a later session of about the same size can reuse the region.
        code_size = PAGE << (_page_up(_STUBS + len(self.sites) * STUB_SIZE) // PAGE - 1).bit_length()
        self.code_size = code_size
        self.process = resident.process
        self.resident = resident
        self.enabled = _session_flag(resident)
        columns = _site_columns(self.sites)  # once: for the stubs and for the batch
        addresses, _, original = columns
        still_used, via = _region_guards(runtime or graph.GraphRuntime.find(resident.process), resident.process)
        self.region: SharedRegion = resident.map_shared(
            code_size=code_size, data_size=data_size, near=int(addresses.min()), name=name, apart=True, reuse=True,
            still_used=still_used, via=via)
        try:
            self._restrict(resident.process.pid, code_size)
            self.data_address = self.region.data_address
            self._populate(resident, code_size, data_size)
            code, self.labels = generate(base=self.region.address, data=self.data_address, mode=mode, abi=abi,
                                         sites=self.sites, ring=self.ring, counters=self.counters,
                                         enabled=self.enabled, runtime=runtime, columns=columns)
        except BaseException:
            self.region.local.close()  # the target keeps its (unused) mapping: nothing points into it
            raise
        resident.write_code(self.region, code)
        self.data: memoryview | None = memoryview(self.region.local)[code_size:]
        if self.ring is not None:
            for b in range(self.ring.buffers):
                block = self.ring.blocks_offset + b * self.ring.stride
                struct.pack_into("<Q", self.data, block + CTL_LIMIT, self.ring.bytes)
        # The batch that sends site i to stub i: columns (PatchArray), built for every site at once.
        stubs = np.uint64(self.labels["stubs"]) + np.arange(len(self.sites), dtype=np.uint64) * np.uint64(STUB_SIZE)
        self.patches = PatchArray.build(addresses, original, encode_calls(addresses, stubs))

    def shadow_counts(self) -> tuple[int, int]:
        """Calls traced entry-only so far (graph): (no shadow stack for the thread, its
        shadow stack full)."""
        assert self.data is not None
        return struct.unpack_from("<QQ", self.data, HDR_SHADOW_NO_THREAD)

    def disable(self) -> None:
        """From now on its routines record and count nothing (they still run, and
        send every call on): the end of a session, before its last drain."""
        if self.process.alive():
            self.process.write(self.enabled, b"\0")

    def _populate(self, resident: Resident, code_size: int, data_size: int) -> None:
        """Map every data page now, in the target and in the tool (MADV_POPULATE_WRITE).

        A first touch costs a page fault (1-4 us in a VM, i.e. 10-30 ns per
        record amortized); better paid here than in the traced program's hot
        path or the reader's. Kernels before 5.14 refuse it: pages then fault lazily."""
        try:
            resident.syscall(SYS_madvise, self.data_address, data_size, MADV_POPULATE_WRITE)
            self.region.local.madvise(MADV_POPULATE_WRITE, code_size, data_size)
        except (InjectionError, OSError):
            pass

    def _restrict(self, pid: int, code_size: int) -> None:
        """Make the memfd mode 0600 (memfd_create makes it 0777): only our user opens it.

        Through the code part's map_files link (the region is two mappings, RX
        and RW, of one memfd). Reaching it needs ptrace access to the target
        anyway, so a kernel that refuses is not an error."""
        start = self.region.address
        try:
            os.chmod(f"/proc/{pid}/map_files/{start:x}-{start + code_size:x}", 0o600)
        except OSError:
            pass

    def stub(self, i: int) -> int:
        """Address of site ``i``'s stub in the target."""
        return self.labels["stubs"] + i * STUB_SIZE

    def counts(self) -> np.ndarray:
        """Per-site counts (u64), summed over the CPU rows and the fallback row."""
        assert self.counters is not None
        g = self.counters
        rows = np.frombuffer(self.data, dtype="<u8", count=g.rows * g.row_bytes // 8,
                             offset=g.rows_offset).reshape(g.rows, -1)
        total = rows[:, : g.sites].sum(axis=0, dtype=np.uint64)
        del rows
        return total

    def close(self, *, discard: bool = False, release: bool = False) -> None:
        """Release the tool's view; ``discard``: give back the record pages' memory too;
        ``release``: give the whole region back for a later session to reuse (only once
        every site leading here was restored and every thread was seen out of it).

        Only the slots are discarded (hole-punched, MADV_REMOVE): control pages
        and code stay, so a late thread still finds a valid buffer (zeroed
        slots) and the kernel a valid rseq descriptor."""
        if self.data is None:
            return
        try:
            self.disable()
        except TextpokeError:
            pass  # the process is gone, or exec'd: nothing of ours runs there any more
        if release and self.resident.release_shared(self.region):
            discard = False  # its data was returned with it
        if discard and self.ring is not None:
            for b in range(self.ring.buffers):
                start = self.code_size + self.ring.blocks_offset + b * self.ring.stride + SLOTS_OFFSET
                try:
                    self.region.local.madvise(mmap.MADV_REMOVE, start, self.ring.bytes)
                except (OSError, AttributeError):
                    break  # memory stays allocated until the target exits; nothing is wrong
        try:
            self.data.release()
            self.region.local.close()
        except BufferError:
            pass  # a caller still holds a numpy view; the mapping goes when that does
        self.data = None  # type: ignore[assignment]

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


__all__ = [
    "CounterGeometry",
    "Mode",
    "RingGeometry",
    "StubKind",
    "ThreadAbi",
    "TracedSite",
    "Tracer",
    "generate",
    "possible_cpus",
    "probe_thread_abi",
]
