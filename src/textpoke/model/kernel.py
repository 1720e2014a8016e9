"""The model's kernel: memory layout and the text, per ISA, built with iced-x86.

The text holds what the ftrace int3 path touches and nothing else:

- ``cpu_loop``: each CPU calls ``traced_func`` forever, once at the loop's stack
  depth and once a word deeper (the kernel is built with 8-byte stack alignment,
  so a function is entered at both 16-byte alignments; x86-64 trap delivery
  aligns the stack, and the two cases put the emulated push in different places).
- ``traced_func``: its first instruction is the 5-byte fentry site; its body
  counts how often it ran (per CPU).
- ``ftrace_caller`` / ``ftrace_regs_caller``: save what the callback clobbers,
  compute ``(ip, parent_ip)`` from the stack, and call the current callback
  through their own call sites ``ftrace_call`` / ``ftrace_regs_call``.
- ``tracer_a`` / ``tracer_b``: the two callbacks; each logs one record
  ``(cpu, tag, function, parent)`` into its CPU's ring in memory.
- ``int3_entry``: the int3 entry code of the variant under test (see
  :class:`EntryFlavor`), which calls ``do_int3``.
- ``do_int3``: a ``ret``.  The handler logic itself is Python
  (:mod:`textpoke.model.handler`), run by the scheduler when a CPU reaches this
  address, reading and writing ``pt_regs`` in emulated memory; the ``ret`` then
  executes on the CPU.  Everything that touches the stack around it -- the
  hardware frame, the gap, the register save, the frame switch, ``iret`` -- is
  machine code or, for the trap itself, done exactly as the CPU does it.

Per-CPU data lives at the base of each CPU's stack (the old ``thread_info``
trick: ``sp & -STACK_SIZE``), so the machine code needs no per-CPU register.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ..x86.insn import CALL_SIZE, NOP5, encode_call
from .asm import Asm, Image, R, Resolver, Role
from .isa import Arch, Isa

# -- memory layout (identical for both ISAs, below 4 GiB) ------------------------------

BASE = 0x0010_0000
TEXT = BASE
TEXT_LIMIT = 0x1000
GDT = BASE + 0x1000
DATA = BASE + 0x1800
STACKS = BASE + 0x2000
STACK_SIZE = 0x1000

KERNEL_CS = 0x08
KERNEL_DS = 0x10

#: Log records kept per CPU (a ring; the checks read the newest one).
LOG_RECORDS = 16
#: Per-CPU block at the stack base, in words: cpu id, body count, log head; then the log.
PERCPU_CPU_ID = 0
PERCPU_BODY = 1
PERCPU_LOG_HEAD = 2
PERCPU_LOG = 0x40
#: Record layout, in words.
RECORD_WORDS = 4  # cpu, tag, function, parent

#: Tags the two callbacks write into their records.
TAG_A = 0xA
TAG_B = 0xB

#: The fentry sites (``__mcount_loc``) and the two callback call sites.
FENTRY = "fentry"
FTRACE_CALL = "ftrace_call"
FTRACE_REGS_CALL = "ftrace_regs_call"
SITES = (FENTRY, FTRACE_CALL, FTRACE_REGS_CALL)
#: Sites whose call goes straight to a callback (their passes produce one record).
CALLBACK_SITES = (FTRACE_CALL, FTRACE_REGS_CALL)
TRACERS = {"tracer_a": TAG_A, "tracer_b": TAG_B}

#: What each site holds before the patcher runs: tracing off, callback A installed.
INITIAL_SITE_STATE: Mapping[str, str | None] = {
    FENTRY: None,
    FTRACE_CALL: "tracer_a",
    FTRACE_REGS_CALL: "tracer_a",
}


class EntryFlavor(enum.Enum):
    """Which int3 entry code the text carries."""

    #: x86-64 since 2019 (Linux 5.2): from kernel mode, copy the 6-word frame down 6 words (the gap).
    GAP = "gap"
    #: x86-64 before 2019: pt_regs is built right on the hardware frame.
    NO_GAP = "no-gap"
    #: x86-32 as proposed in 2019 (not merged): reserve 8 bytes, call, ``movl %eax,%esp`` (use the returned frame).
    RETURNED_FRAME = "returned-frame"
    #: x86-32 behind a notifier: reserve, call, ``addl $8,%esp`` (the returned frame is lost).
    DISCARDED_FRAME = "discarded-frame"
    #: x86-32 before 2019: no reserve, the handler's frame is the trap frame.
    PLAIN = "plain"
    #: x86-32 as merged (Linux 5.4): FIXUP_FRAME completes pt_regs (with a gap), IRET_FRAME
    #: rebuilds the iret frame below the (possibly changed) regs->sp.
    COMPLETE_FRAME = "complete-frame"


class StepKind(enum.Enum):
    """Addresses where the scheduler does more than execute one instruction."""

    CALL = "call"            # push a shadow return address after the call
    LOOP_CALL = "loop-call"  # a caller-loop call of traced_func (parent for the records)
    RET = "ret"              # check the popped return address against the shadow stack
    IRET = "iret"            # check the frame iret pops against the one delivered
    SITE = "site"            # a patchable site: classify the fetch, maybe trap
    HANDLER = "handler"      # do_int3: run the Python handler, then its ret
    RESTORE = "restore"      # the entry starts restoring pt_regs: from the right frame?
    PASS_END = "pass-end"    # site + 5: a call through the site came back
    CALL_DONE = "call-done"  # after a loop call: the traced function ran once


@dataclass(frozen=True)
class Kernel:
    """The assembled text and everything the machine and the checks need to know of it."""

    isa: Isa
    entry: EntryFlavor
    image: Image
    sites: Mapping[str, int]
    kinds: Mapping[int, StepKind]
    boundaries: frozenset[int]
    #: Data words (addresses): ``modifying_ftrace_code``, ``ftrace_update_func``,
    #: ``ftrace_update_func_call``, ``__mcount_loc`` count and entries.
    modifying_ftrace_code: int
    ftrace_update_func: int
    ftrace_update_func_call: int
    mcount_count: int
    mcount_loc: int

    def sym(self, name: str) -> int:
        return self.image.symbols[name]

    def site_name(self, addr: int) -> str:
        for name, at in self.sites.items():
            if at == addr:
                return name
        raise KeyError(f"{addr:#x} is not a site")

    def site_bytes(self, site: str, target: str | None) -> bytes:
        """The 5 bytes of ``site`` calling ``target`` (``None``: the nop)."""
        at = self.sites[site]
        return NOP5 if target is None else encode_call(at, self.sym(target))

    def tag_of(self, addr: int) -> int | None:
        for name, tag in TRACERS.items():
            if self.sym(name) == addr:
                return tag
        return None

    # -- per-CPU layout -----------------------------------------------------------

    @staticmethod
    def stack_base(cpu: int) -> int:
        return STACKS + cpu * STACK_SIZE

    def stack_top(self, cpu: int) -> int:
        # 8 mod 16: the first call leaves the traced function's fentry at a 16-byte
        # aligned rsp (the x86-64 case where the frame ends right at the old rsp).
        return self.stack_base(cpu) + STACK_SIZE - 8

    def percpu(self, cpu: int, word_index: int) -> int:
        return self.stack_base(cpu) + word_index * self.isa.word

    def record_addr(self, cpu: int, index: int) -> int:
        slot = index % LOG_RECORDS
        return self.stack_base(cpu) + PERCPU_LOG + slot * RECORD_WORDS * self.isa.word

    @staticmethod
    def memory_size(ncpus: int) -> int:
        return STACKS - BASE + ncpus * STACK_SIZE

    def initial_memory(self, ncpus: int, site_state: Mapping[str, str | None]) -> bytes:
        """Memory image: text (sites as ``site_state`` says), GDT, data, per-CPU blocks."""
        mem = bytearray(self.memory_size(ncpus))
        mem[TEXT - BASE : TEXT - BASE + len(self.image.code)] = self.image.code
        for site, target in site_state.items():
            at = self.sites[site] - BASE
            mem[at : at + CALL_SIZE] = self.site_bytes(site, target)
        gdt = gdt_for(self.isa)
        mem[GDT - BASE : GDT - BASE + len(gdt)] = gdt
        word = self.isa.word_struct
        word.pack_into(mem, self.mcount_count - BASE, 1)
        word.pack_into(mem, self.mcount_loc - BASE, self.sites[FENTRY])
        for cpu in range(ncpus):
            word.pack_into(mem, self.percpu(cpu, PERCPU_CPU_ID) - BASE, cpu)
        return bytes(mem)


def _gdt_entry(*, access: int, flags: int) -> bytes:
    """A flat (base 0, limit 4 GiB) descriptor."""
    limit = 0xFFFFF
    value = (limit & 0xFFFF) | (access << 40) | (((limit >> 16) & 0xF) << 48) | (flags << 52)
    return struct.pack("<Q", value)


#: null, kernel code (L=1 for x86-64, D=1 for x86-32: the CPU ignores the other), kernel data.
GDT_BYTES_64 = b"\0" * 8 + _gdt_entry(access=0x9A, flags=0xA) + _gdt_entry(access=0x92, flags=0xC)
GDT_BYTES_32 = b"\0" * 8 + _gdt_entry(access=0x9A, flags=0xC) + _gdt_entry(access=0x92, flags=0xC)


def gdt_for(isa: Isa) -> bytes:
    return GDT_BYTES_64 if isa.arch is Arch.X86_64 else GDT_BYTES_32


# -- text -------------------------------------------------------------------------------


def _site_call(target: str | None):
    def initial(at: int, resolve: Resolver) -> bytes:
        return NOP5 if target is None else encode_call(at, resolve(target))

    return initial


def _common_text(a: Asm, *, sp: int, ax: int, word: int) -> None:
    """cpu_loop and traced_func: the same shape on both ISAs."""
    a.label("cpu_loop")
    a.label("loop_call_a")
    a.call("traced_func")
    a.label("ret_a")
    # One word deeper for the second call: kernel stacks are only 8-byte aligned,
    # so functions are entered at either 16-byte alignment.
    a.push(ax)
    a.label("loop_call_b")
    a.call("traced_func")
    a.label("ret_b")
    a.pop(ax)
    a.jmp("cpu_loop")

    a.label("traced_func")
    a.site(FENTRY, _site_call(INITIAL_SITE_STATE[FENTRY]))
    a.mov(ax, sp)
    a.and_imm32(ax, -STACK_SIZE)
    a.inc_mem(ax, PERCPU_BODY * word)
    a.ret()


def _tracer(a: Asm, tag: int, *, sp: int, base: int, idx: int, rec: int,
            arg_ip: int, arg_parent: int, word: int) -> None:
    """Body of a callback ``(ip, parent_ip)``: append ``(cpu, tag, ip, parent_ip)`` to
    this CPU's log.  Clobbers ``base``, ``idx``, ``rec`` and ``arg_ip``."""
    a.mov(base, sp)
    a.and_imm32(base, -STACK_SIZE)
    a.load(idx, base, PERCPU_LOG_HEAD * word)
    a.and_imm8(idx, LOG_RECORDS - 1)
    a.shl_imm8(idx, (RECORD_WORDS * word).bit_length() - 1)
    a.lea(rec, base, idx, PERCPU_LOG)
    a.store(rec, 2 * word, arg_ip)
    a.store(rec, 3 * word, arg_parent)
    a.store_imm(rec, 1 * word, tag)
    a.load(arg_ip, base, PERCPU_CPU_ID * word)
    a.store(rec, 0, arg_ip)
    a.inc_mem(base, PERCPU_LOG_HEAD * word)


def _text_x86_64(entry: EntryFlavor) -> Asm:
    a = Asm(64)
    _common_text(a, sp=R.RSP, ax=R.RAX, word=8)

    # ftrace_caller: save_mcount_regs (the registers a C callback may clobber).
    saved = (R.RAX, R.RCX, R.RDX, R.RSI, R.RDI)
    a.label("ftrace_caller")
    for reg in saved:
        a.push(reg)
    depth = len(saved) * 8
    a.load(R.RDI, R.RSP, depth)          # return address into the traced function
    a.sub_imm8(R.RDI, CALL_SIZE)         # ... minus the call: the function (its fentry site)
    a.load(R.RSI, R.RSP, depth + 8)      # the traced function's own return address
    a.site(FTRACE_CALL, _site_call(INITIAL_SITE_STATE[FTRACE_CALL]))
    for reg in reversed(saved):
        a.pop(reg)
    a.ret()

    # ftrace_regs_caller: the full-register variant; the int3 handler emulates a call to it
    # for any fentry site hit while the site changes.
    regs_saved = (R.RAX, R.RCX, R.RDX, R.RSI, R.RDI, R.R8, R.R9, R.R10, R.R11)
    a.label("ftrace_regs_caller")
    a.pushf()
    for reg in regs_saved:
        a.push(reg)
    depth = (len(regs_saved) + 1) * 8
    a.load(R.RDI, R.RSP, depth)
    a.sub_imm8(R.RDI, CALL_SIZE)
    a.load(R.RSI, R.RSP, depth + 8)
    a.site(FTRACE_REGS_CALL, _site_call(INITIAL_SITE_STATE[FTRACE_REGS_CALL]))
    for reg in reversed(regs_saved):
        a.pop(reg)
    a.popf()
    a.ret()

    for name, tag in TRACERS.items():
        a.label(name)
        _tracer(a, tag, sp=R.RSP, base=R.RAX, idx=R.RCX, rec=R.RDX,
                arg_ip=R.RDI, arg_parent=R.RSI, word=8)
        a.ret()

    # int3 entry: the CPU pushed ss, rsp, rflags, cs, rip (16-byte aligned).
    a.label("int3_entry")
    a.push_imm8(-1)                      # orig_ax: idtentry's error-code slot for #BP
    if entry is EntryFlavor.GAP:
        a.test_mem8(R.RSP, 16, 3)        # CS in the frame: trapped in user mode?
        a.jnz("int3_save")
        # create_gap: .rept 6; pushq 5*8(%rsp) -- copy the 6-word frame down 6 words,
        # so the words between the copy and the interrupted rsp are free for
        # int3_emulate_push (the handler's push lands there, not on the frame).
        for _ in range(6):
            a.push_mem(R.RSP, 5 * 8)
    elif entry is not EntryFlavor.NO_GAP:
        raise ValueError(f"{entry} is not an x86-64 entry")
    a.label("int3_save")
    pushed = (R.RDI, R.RSI, R.RDX, R.RCX, R.RAX, R.R8, R.R9, R.R10, R.R11,
              R.RBX, R.RBP, R.R12, R.R13, R.R14, R.R15)
    for reg in pushed:                   # pt_regs, r15 lowest
        a.push(reg)
    a.mov(R.RDI, R.RSP)                  # struct pt_regs *regs
    a.xor32(R.ESI, R.ESI)                # error_code
    a.label("call_do_int3")
    a.call("do_int3")
    a.label("int3_restore")
    for reg in reversed(pushed):
        a.pop(reg)
    a.add_imm8(R.RSP, 8)                 # orig_ax
    a.label("int3_iret")
    a.iret()

    a.label("do_int3")
    a.ret()
    return a


def _text_i386(entry: EntryFlavor) -> Asm:
    a = Asm(32)
    _common_text(a, sp=R.ESP, ax=R.EAX, word=4)

    # -mregparm=3: callbacks take (ip, parent_ip) in eax, edx.
    saved = (R.EAX, R.ECX, R.EDX)
    a.label("ftrace_caller")
    for reg in saved:
        a.push(reg)
    depth = len(saved) * 4
    a.load(R.EAX, R.ESP, depth)
    a.sub_imm8(R.EAX, CALL_SIZE)
    a.load(R.EDX, R.ESP, depth + 4)
    a.site(FTRACE_CALL, _site_call(INITIAL_SITE_STATE[FTRACE_CALL]))
    for reg in reversed(saved):
        a.pop(reg)
    a.ret()

    regs_saved = (R.EAX, R.ECX, R.EDX, R.EBX, R.ESI, R.EDI, R.EBP)
    a.label("ftrace_regs_caller")
    a.pushf()
    for reg in regs_saved:
        a.push(reg)
    depth = (len(regs_saved) + 1) * 4
    a.load(R.EAX, R.ESP, depth)
    a.sub_imm8(R.EAX, CALL_SIZE)
    a.load(R.EDX, R.ESP, depth + 4)
    a.site(FTRACE_REGS_CALL, _site_call(INITIAL_SITE_STATE[FTRACE_REGS_CALL]))
    for reg in reversed(regs_saved):
        a.pop(reg)
    a.popf()
    a.ret()

    for name, tag in TRACERS.items():
        a.label(name)
        a.push(R.EBX)                    # callee-saved in the i386 ABI
        _tracer(a, tag, sp=R.ESP, base=R.ECX, idx=R.EBX, rec=R.EBX,
                arg_ip=R.EAX, arg_parent=R.EDX, word=4)
        a.pop(R.EBX)
        a.ret()

    # int3 entry: a same-privilege trap pushed only eflags, cs, eip.
    a.label("int3_entry")
    a.push_imm8(-1)                      # orig_ax
    if entry is EntryFlavor.COMPLETE_FRAME:
        # FIXUP_FRAME: from kernel mode, build a complete 5-word iret frame below
        # the hardware one (which becomes the gap), so regs->sp is real.
        a.test_mem8(R.ESP, 8, 3)         # CS (orig_ax, ip, cs, flags)
        a.jnz("int3_save")
        a.push_seg(R.SS)                 # ss
        a.push(R.ESP)                    # sp (points at the ss slot) ...
        a.add_mem_imm8(R.ESP, 0, 5 * 4)  # ... moved up to the interrupted context
        for _ in range(4):               # flags, cs, ip, orig_ax
            a.push_mem(R.ESP, 5 * 4)
    a.label("int3_save")
    for seg in (R.GS, R.FS, R.ES, R.DS):
        a.push_seg(seg)
    pushed = (R.EAX, R.EBP, R.EDI, R.ESI, R.EDX, R.ECX, R.EBX)
    for reg in pushed:                   # SAVE_ALL: pt_regs, ebx lowest
        a.push(reg)
    a.mov(R.EAX, R.ESP)                  # struct pt_regs *regs (regparm: eax)
    a.xor32(R.EDX, R.EDX)                # error_code
    reserve = entry in (EntryFlavor.RETURNED_FRAME, EntryFlavor.DISCARDED_FRAME)
    if reserve:
        # Room below pt_regs: the handler may move the frame down one word, and
        # that word must not be our return address.
        a.sub_imm8(R.ESP, 8)
    a.label("call_do_int3")
    a.call("do_int3")
    if entry is EntryFlavor.RETURNED_FRAME:
        a.mov(R.ESP, R.EAX)              # return through the frame the handler gave back
    elif entry is EntryFlavor.DISCARDED_FRAME:
        a.add_imm8(R.ESP, 8)             # a notifier returns a status, not a frame
    elif entry not in (EntryFlavor.PLAIN, EntryFlavor.COMPLETE_FRAME):
        raise ValueError(f"{entry} is not an i386 entry")
    a.label("int3_restore")
    for reg in reversed(pushed):
        a.pop(reg)
    for seg in (R.DS, R.ES, R.FS, R.GS):
        a.pop_seg(seg)
    a.add_imm8(R.ESP, 4)                 # orig_ax
    if entry is EntryFlavor.COMPLETE_FRAME:
        # IRET_FRAME: rebuild the 3-word iret frame right below the (possibly
        # modified) regs->sp, then return through it.
        a.test_mem8(R.ESP, 4, 3)         # CS (ip, cs, flags, sp, ss)
        a.jnz("int3_iret")
        a.push(R.EAX)
        a.push(R.ECX)
        a.load(R.EAX, R.ESP, 5 * 4)      # regs->sp
        for src, dst in ((4, -1), (3, -2), (2, -3), (1, -4)):   # flags, cs, ip, eax
            a.load(R.ECX, R.ESP, src * 4)
            a.store(R.EAX, dst * 4, R.ECX)
        a.pop(R.ECX)
        a.lea(R.ESP, R.EAX, disp=-4 * 4)
        a.pop(R.EAX)
    a.label("int3_iret")
    a.iret()

    a.label("do_int3")
    a.ret()
    return a


#: Labels that are the entry of a CALL_DONE checkpoint / a loop call.
_CALL_DONE = ("ret_a", "ret_b")
_LOOP_CALLS = ("loop_call_a", "loop_call_b")


def build_kernel(isa: Isa, entry: EntryFlavor) -> Kernel:
    """Assemble the text for ``isa`` with ``entry`` and derive the step kinds."""
    asm = _text_x86_64(entry) if isa.arch is Arch.X86_64 else _text_i386(entry)
    image = asm.assemble(TEXT)
    if len(image.code) > TEXT_LIMIT:
        raise AssertionError("kernel text outgrew its page")
    sym = image.symbols
    sites = {name: sym[name] for name in SITES}

    kinds: dict[int, StepKind] = {}
    for placed in image.insns:
        if placed.role is Role.SITE:
            kinds[placed.addr] = StepKind.SITE
        elif placed.role is Role.CALL:
            kinds[placed.addr] = StepKind.CALL
        elif placed.role is Role.RET:
            kinds[placed.addr] = StepKind.RET
        elif placed.role is Role.IRET:
            kinds[placed.addr] = StepKind.IRET
    for name in _LOOP_CALLS:
        kinds[sym[name]] = StepKind.LOOP_CALL
    kinds[sym["do_int3"]] = StepKind.HANDLER

    plain = {p.addr for p in image.insns if p.role is Role.PLAIN}
    for addr in [*(at + CALL_SIZE for at in sites.values()), *(sym[n] for n in _CALL_DONE),
                 sym["int3_restore"]]:
        if addr not in plain:
            raise AssertionError(f"checkpoint at {image.symbolize(addr)} is not a plain instruction")
    for at in sites.values():
        kinds[at + CALL_SIZE] = StepKind.PASS_END
    for name in _CALL_DONE:
        kinds[sym[name]] = StepKind.CALL_DONE
    kinds[sym["int3_restore"]] = StepKind.RESTORE

    word = isa.word
    return Kernel(
        isa=isa,
        entry=entry,
        image=image,
        sites=sites,
        kinds=kinds,
        boundaries=frozenset(p.addr for p in image.insns),
        modifying_ftrace_code=DATA,
        ftrace_update_func=DATA + word,
        ftrace_update_func_call=DATA + 2 * word,
        mcount_count=DATA + 3 * word,
        mcount_loc=DATA + 4 * word,
    )
