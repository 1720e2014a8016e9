"""The resident SIGTRAP handler (generated machine code) against handle_int3.

The handler runs on a unicorn CPU over a fabricated siginfo/ucontext and the
real table layout; every result must equal the pure specification's.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn.x86_const import (
    UC_X86_INS_SYSCALL, UC_X86_REG_R10, UC_X86_REG_RAX, UC_X86_REG_RDI, UC_X86_REG_RDX, UC_X86_REG_RIP,
    UC_X86_REG_RSI, UC_X86_REG_RSP,
)

from textpoke.poke.resident import (
    CODE_SIZE, HANDLER_COPIES, OLD_ACTIONS, SIG_IGN, SIGINFO_CODE, STAT_EMULATED, STAT_NOT_OURS, TABLE_OFFSET,
    UC_RIP, UC_RSP, generate_code, handler_label, region_size,
)
from textpoke.poke.spec import NOT_OURS, SI_KERNEL, TrapFrame, handle_int3
from textpoke.poke.table import SiteTable
from textpoke.target import syscalls as sc
from textpoke.x86.insn import NOP5, encode_call, encode_jmp

CAPACITY = 64
BASE = 0x7F00_0000_0000
STACK = 0x7E00_0000_0000
STACK_SIZE = 0x10000
TEXT = 0x40_0000
SENTINEL = 0x1000  # return address of the handler call: emulation stops there
SIGINFO = STACK + 0x1000
UCONTEXT = STACK + 0x2000


def run_handler(table_bytes: bytes, *, ip: int, sp: int, si_code: int, copy: int = 0,
                chain_to: int = SIG_IGN) -> tuple[int, int, int, int, int]:
    """(rip, rsp, word at new rsp, emulated count, not-ours count) after handler copy ``copy``.

    Every saved disposition is SIG_IGN but the copy's own, ``chain_to``."""
    rip, rsp, word, emulated, not_ours, _ = run_handler_sp(table_bytes, ip=ip, sp=sp, si_code=si_code,
                                                           copy=copy, chain_to=chain_to)
    return rip, rsp, word, emulated, not_ours


#: Syscalls the handler made in the last run_handler_sp: (nr, rdi, the u64 at rsi, rdx, r10).
SYSCALLS: list[tuple[int, int, int, int, int]] = []
#: rdi, rsi, rdx when the handler reached SENTINEL (chained: the program's handler's arguments).
ARGS: list[int] = []


def run_handler_sp(table_bytes: bytes, *, ip: int, sp: int, si_code: int, copy: int,
                   chain_to: int) -> tuple[int, int, int, int, int, int]:
    """run_handler, plus the handler's own rsp when it reached SENTINEL (a ret pops it)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    size = region_size(CAPACITY)
    uc.mem_map(BASE, size)
    uc.mem_map(STACK, STACK_SIZE)
    uc.mem_map(SENTINEL, 0x1000)
    code, labels = generate_code(capacity=CAPACITY)
    uc.mem_write(BASE, code)
    ctl = BASE + CODE_SIZE
    uc.mem_write(ctl + TABLE_OFFSET, table_bytes)
    for k, slot in enumerate(OLD_ACTIONS):  # not ours: ignored (no syscall), or chained
        uc.mem_write(ctl + slot, struct.pack("<Q", chain_to if k == copy else SIG_IGN))
    uc.mem_write(SIGINFO + SIGINFO_CODE, struct.pack("<i", si_code))
    uc.mem_write(UCONTEXT + UC_RIP, struct.pack("<Q", ip))
    uc.mem_write(UCONTEXT + UC_RSP, struct.pack("<Q", sp))
    frame_sp = STACK + 0x8000
    uc.mem_write(frame_sp, struct.pack("<Q", SENTINEL))
    uc.reg_write(UC_X86_REG_RSP, frame_sp)
    uc.reg_write(UC_X86_REG_RDI, 5)
    uc.reg_write(UC_X86_REG_RSI, SIGINFO)
    uc.reg_write(UC_X86_REG_RDX, UCONTEXT)
    SYSCALLS.clear()

    def syscall(uc: Uc, _: object) -> None:
        rsi = uc.reg_read(UC_X86_REG_RSI)
        word = struct.unpack("<Q", bytes(uc.mem_read(rsi, 8)))[0] if STACK <= rsi < STACK + STACK_SIZE else -1
        SYSCALLS.append((uc.reg_read(UC_X86_REG_RAX), uc.reg_read(UC_X86_REG_RDI), word,
                         uc.reg_read(UC_X86_REG_RDX), uc.reg_read(UC_X86_REG_R10)))
        uc.reg_write(UC_X86_REG_RAX, 0)

    uc.hook_add(UC_HOOK_INSN, syscall, None, 1, 0, UC_X86_INS_SYSCALL)
    uc.emu_start(BASE + labels[handler_label(copy)], SENTINEL, count=10_000)
    assert uc.reg_read(UC_X86_REG_RIP) == SENTINEL
    ARGS[:] = [uc.reg_read(r) for r in (UC_X86_REG_RDI, UC_X86_REG_RSI, UC_X86_REG_RDX)]
    rsp, rip = struct.unpack("<QQ", bytes(uc.mem_read(UCONTEXT + UC_RSP, 16)))  # gregs RSP, RIP
    word = struct.unpack("<Q", bytes(uc.mem_read(rsp, 8)))[0] if STACK <= rsp < STACK + STACK_SIZE else 0
    emulated = struct.unpack("<Q", bytes(uc.mem_read(ctl + STAT_EMULATED, 8)))[0]
    not_ours = struct.unpack("<Q", bytes(uc.mem_read(ctl + STAT_NOT_OURS, 8)))[0]
    return rip, rsp, word, emulated, not_ours, uc.reg_read(UC_X86_REG_RSP) - frame_sp


insn_kinds = st.sampled_from(["nop", "call", "jmp"])


@st.composite
def scenarios(draw):
    sites = draw(st.lists(st.integers(0, 4000).map(lambda k: TEXT + 8 * k), min_size=1, max_size=40, unique=True))
    buffer = bytearray(SiteTable.size_for(CAPACITY))
    table = SiteTable(buffer, capacity=CAPACITY)
    for site in sites:
        kind = draw(insn_kinds)
        target = TEXT + draw(st.integers(0, 1 << 20))
        insn = NOP5 if kind == "nop" else (encode_call if kind == "call" else encode_jmp)(site, target)
        table.publish(site, insn)
    pick = draw(st.sampled_from(sites))
    ip = draw(st.sampled_from([pick + 1, pick, pick + 2, TEXT + 3]))
    si_code = draw(st.sampled_from([SI_KERNEL, SI_KERNEL, 0, 1, 2]))
    sp = STACK + 0x4000 + 8 * draw(st.integers(0, 256)) + draw(st.sampled_from([0, 8]))
    return table, bytes(buffer), ip, sp, si_code


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.integers(0, HANDLER_COPIES - 1))
def test_machine_code_handler_matches_spec(case, copy):
    table, raw, ip, sp, si_code = case
    rip, rsp, word, emulated, not_ours = run_handler(raw, ip=ip, sp=sp, si_code=si_code, copy=copy)
    expected = handle_int3(TrapFrame(ip=ip, sp=sp, si_code=si_code), table)
    if expected is NOT_OURS:
        assert (rip, rsp, emulated, not_ours) == (ip, sp, 0, 1)
        # Installed with SA_NODEFER: what is not ours blocks SIGTRAP first, as without the flag.
        assert SYSCALLS == [(sc.SYS_rt_sigprocmask, sc.SIG_BLOCK, 1 << (sc.SIGTRAP - 1), 0, 8)]
        return
    assert SYSCALLS == []  # emulating a site is no syscall
    assert (rip, rsp, emulated, not_ours) == (expected.ip, expected.sp, 1, 0)
    if expected.stores:
        ((address, value),) = expected.stores
        assert (address, word) == (rsp, value)


def test_call_emulation_pushes_return_address():
    """A fixed case a reader can check by eye: call at 0x401000 to 0x402000."""
    buffer = bytearray(SiteTable.size_for(CAPACITY))
    table = SiteTable(buffer, capacity=CAPACITY)
    table.publish(0x401000, encode_call(0x401000, 0x402000))
    rip, rsp, word, emulated, _ = run_handler(bytes(buffer), ip=0x401001, sp=STACK + 0x5000, si_code=SI_KERNEL)
    assert (rip, rsp, word, emulated) == (0x402000, STACK + 0x5000 - 8, 0x401005, 1)


def test_each_copy_chains_to_its_own_saved_disposition():
    """Not ours: copy k jumps to OLD_ACTIONS[k]'s handler (its rsp untouched,
    the same sig/info/uc), and returns (ret pops) when that one is SIG_IGN."""
    raw = bytes(SiteTable.size_for(CAPACITY))
    for copy in range(HANDLER_COPIES):
        *_, not_ours, popped = run_handler_sp(raw, ip=TEXT + 1, sp=STACK + 0x5000, si_code=SI_KERNEL,
                                              copy=copy, chain_to=SENTINEL)
        assert (not_ours, popped) == (1, 0)  # jumped to the saved handler at SENTINEL
        assert ARGS == [5, SIGINFO, UCONTEXT]  # with the signal's own arguments
        assert SYSCALLS == [(sc.SYS_rt_sigprocmask, sc.SIG_BLOCK, 1 << (sc.SIGTRAP - 1), 0, 8)]
        *_, not_ours, popped = run_handler_sp(raw, ip=TEXT + 1, sp=STACK + 0x5000, si_code=SI_KERNEL,
                                              copy=copy, chain_to=SIG_IGN)
        assert (not_ours, popped) == (1, 8)  # returned
