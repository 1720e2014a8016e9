"""The agent's heal (generated machine code) against heal_model, and the gate.

The heal runs on a unicorn CPU over the real control-region layout; its
syscalls (fstat, pread64/pwrite64 on /proc/self/mem, membarrier, futex) are
served by a fake kernel whose "text" is a dict of sites. Every result must
equal :func:`textpoke.poke.resident.heal_model`, and the syncs must bracket
the writes as the batch protocol does (sync, tails, sync, heads, sync).
"""

from __future__ import annotations

import errno
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn.x86_const import (
    UC_X86_INS_SYSCALL, UC_X86_REG_R8, UC_X86_REG_R10, UC_X86_REG_R12, UC_X86_REG_RAX, UC_X86_REG_RDI,
    UC_X86_REG_RDX, UC_X86_REG_RIP, UC_X86_REG_RSI, UC_X86_REG_RSP,
)

from textpoke.poke.resident import (
    CODE_SIZE, HEAL_BATCHES, HEAL_FAILED, HEAL_PID, HEAL_SITES, MEM_FD, MEM_INO, TABLE_OFFSET, WATCH_HEALED,
    WATCH_HEALING, WATCH_PID, WATCH_STATE, WATCH_TAKEN, generate_code, heal_model, region_size,
)
from textpoke.poke.table import SiteTable
from textpoke.target import syscalls as sc
from textpoke.x86.insn import INT3, NOP5, encode_call, encode_jmp

CAPACITY = 64
BASE = 0x7F00_0000_0000
STACK = 0x7E00_0000_0000
TEXT = 0x40_0000
MEM_INODE = 4242


class FakeKernel:
    """The syscalls the heal makes, over ``text`` (site -> 5 bytes; missing: unmapped)."""

    def __init__(self, text: dict[int, bytes], *, inode: int = MEM_INODE) -> None:
        self.text = {site: bytearray(data) for site, data in text.items()}
        self.inode = inode
        self.log: list[tuple] = []  # ("sync",) / ("write", site, offset, bytes)

    def _find(self, address: int, n: int) -> tuple[bytearray, int] | None:
        for site, data in self.text.items():
            if site <= address and address + n <= site + 5:
                return data, address - site
        return None

    def syscall(self, uc: Uc) -> None:
        nr = uc.reg_read(UC_X86_REG_RAX)
        rdi, rsi, rdx, r10 = (uc.reg_read(r) for r in (UC_X86_REG_RDI, UC_X86_REG_RSI, UC_X86_REG_RDX, UC_X86_REG_R10))
        result = 0
        if nr == sc.SYS_fstat:
            uc.mem_write(rsi + sc.STAT_INO, struct.pack("<Q", self.inode))
        elif nr == sc.SYS_pread64:
            found = self._find(r10, rdx)
            if found is None:
                result = -errno.EIO
            else:
                data, at = found
                uc.mem_write(rsi, bytes(data[at : at + rdx]))
                result = rdx
        elif nr == sc.SYS_pwrite64:
            found = self._find(r10, rdx)
            if found is None:
                result = -errno.EIO
            else:
                data, at = found
                data[at : at + rdx] = bytes(uc.mem_read(rsi, rdx))
                site = r10 - at
                self.log.append(("write", site, at, bytes(data[at : at + rdx])))
                result = rdx
        elif nr == sc.SYS_membarrier:
            assert rdi == sc.MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE
            self.log.append(("sync",))
        elif nr == sc.SYS_futex:
            pass  # the wake of the gate's waiters
        else:
            raise AssertionError(f"unexpected syscall {nr}")
        uc.reg_write(UC_X86_REG_RAX, result & 0xFFFF_FFFF_FFFF_FFFF)


def run_heal(table_bytes: bytes, text: dict[int, bytes], *, inode: int = MEM_INODE) -> tuple[FakeKernel, bytes]:
    """Run the heal from its label to its jump back into the agent loop; (kernel, control area)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(BASE, region_size(CAPACITY))
    uc.mem_map(STACK, 0x10000)
    code, labels = generate_code(capacity=CAPACITY)
    uc.mem_write(BASE, code)
    ctl = BASE + CODE_SIZE
    uc.mem_write(ctl + TABLE_OFFSET, table_bytes)
    uc.mem_write(ctl + MEM_FD, struct.pack("<I", 5))
    uc.mem_write(ctl + MEM_INO, struct.pack("<Q", MEM_INODE))
    uc.mem_write(ctl + WATCH_PID, struct.pack("<I", 4321))
    uc.mem_write(ctl + WATCH_STATE, struct.pack("<I", WATCH_HEALING))
    kernel = FakeKernel(text, inode=inode)
    uc.hook_add(UC_HOOK_INSN, lambda uc_, _: kernel.syscall(uc_), None, 1, 0, UC_X86_INS_SYSCALL)
    uc.reg_write(UC_X86_REG_R12, ctl)
    uc.reg_write(UC_X86_REG_RSP, STACK + 0x8000)
    uc.reg_write(UC_X86_REG_R8, 0)
    uc.emu_start(BASE + labels["heal"], BASE + labels["agent_loop"], count=2_000_000)
    assert uc.reg_read(UC_X86_REG_RIP) == BASE + labels["agent_loop"]
    return kernel, bytes(uc.mem_read(ctl, TABLE_OFFSET))


def _insn(kind: str, site: int, target: int) -> bytes:
    return NOP5 if kind == "nop" else (encode_call if kind == "call" else encode_jmp)(site, target)


@st.composite
def batches(draw):
    """A table and the text of a batch cut short at any point: each site
    whole old, whole new, int3 + old/new/mixed tail, or unmapped meanwhile."""
    sites = draw(st.lists(st.integers(0, 4000).map(lambda k: TEXT + 8 * k), min_size=1, max_size=40, unique=True))
    buffer = bytearray(SiteTable.size_for(CAPACITY))
    table = SiteTable(buffer, capacity=CAPACITY)
    text: dict[int, bytes] = {}
    for site in sites:
        kinds = st.sampled_from(["nop", "call", "jmp"])
        old = _insn(draw(kinds), site, TEXT + draw(st.integers(0, 1 << 20)))
        new = _insn(draw(kinds), site, TEXT + draw(st.integers(0, 1 << 20)))
        table.publish(site, new)
        state = draw(st.sampled_from(["old", "new", "int3_old", "int3_new", "int3_mixed", "unmapped"]))
        if state == "unmapped":
            continue
        if state == "int3_mixed":
            cut = draw(st.integers(1, 4))
            text[site] = INT3 + new[1 : 1 + cut] + old[1 + cut :]
        else:
            whole = old if state in ("old", "int3_old") else new
            text[site] = INT3 + whole[1:] if state.startswith("int3") else whole
    return table, bytes(buffer), text


@settings(max_examples=120, deadline=None)
@given(batches())
def test_machine_code_heal_matches_model(case):
    table, raw, text = case
    kernel, ctl = run_heal(raw, text)
    expected, healed = heal_model(table.as_dict(), text)
    assert {site: bytes(data) for site, data in kernel.text.items()} == expected
    # Protocol order: nothing in flight, no sync; else sync, tails, sync, heads, sync.
    kinds = [entry[0] for entry in kernel.log]
    if healed:
        first, second, third = (i for i, kind in enumerate(kinds) if kind == "sync")
        assert kinds.count("sync") == 3 and first == 0 and third == len(kinds) - 1
        tails = kernel.log[first + 1 : second]
        heads = kernel.log[second + 1 : third]
        assert sorted(w[1] for w in tails) == sorted(w[1] for w in heads) and len(tails) == healed
        assert all(w[2] == 1 for w in tails) and all(w[2] == 0 for w in heads)
    else:
        assert kinds == []
    state, batches_done, sites, pid, failed = (
        struct.unpack_from("<I", ctl, WATCH_STATE)[0], struct.unpack_from("<Q", ctl, HEAL_BATCHES)[0],
        struct.unpack_from("<Q", ctl, HEAL_SITES)[0], struct.unpack_from("<I", ctl, HEAL_PID)[0],
        struct.unpack_from("<I", ctl, HEAL_FAILED)[0])
    assert (state, batches_done, sites, pid, failed) == (WATCH_HEALED, 1, healed, 4321, 0)


def test_heal_writes_nothing_through_a_descriptor_that_is_not_its_own():
    """MEM_FD's inode changed (the program closed it and reused the number):
    no byte is written, and the batch is left to the next tool (TAKEN: the
    gate stays closed, the next attach finishes the sites)."""
    buffer = bytearray(SiteTable.size_for(CAPACITY))
    table = SiteTable(buffer, capacity=CAPACITY)
    site = TEXT + 0x100
    table.publish(site, encode_call(site, TEXT + 0x2000))
    kernel, ctl = run_heal(bytes(buffer), {site: INT3 + NOP5[1:]}, inode=MEM_INODE + 1)
    assert kernel.log == [] and bytes(kernel.text[site]) == INT3 + NOP5[1:]
    assert struct.unpack_from("<I", ctl, WATCH_STATE)[0] == WATCH_TAKEN
    assert struct.unpack_from("<Q", ctl, HEAL_BATCHES)[0] == 0


def test_gate_waits_while_a_batch_may_have_int3s_then_returns_through_rt_sigreturn():
    """The gate sleeps (futex on WATCH_STATE) in every state but IDLE and HEALED,
    then its only way out is rt_sigreturn, with rsp where the tool left it."""
    code, labels = generate_code(capacity=CAPACITY)
    for states in ([1, 2, 4, 3], [0], [1, 0]):  # ARMED, HEALING, TAKEN ... then open
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(BASE, region_size(CAPACITY))
        uc.mem_write(BASE, code)
        state_at = BASE + CODE_SIZE + WATCH_STATE
        uc.mem_write(state_at, struct.pack("<I", states[0]))
        seen: list[tuple[int, int]] = []
        later = iter(states[1:])

        def syscall(uc_: Uc, _: object) -> None:
            nr = uc_.reg_read(UC_X86_REG_RAX)
            seen.append((nr, struct.unpack("<I", bytes(uc_.mem_read(state_at, 4)))[0]))
            if nr == sc.SYS_futex:
                assert uc_.reg_read(UC_X86_REG_RDI) == state_at and uc_.reg_read(UC_X86_REG_RSI) == 0
                uc_.mem_write(state_at, struct.pack("<I", next(later)))
            else:
                assert nr == sc.SYS_rt_sigreturn
                uc_.emu_stop()

        uc.hook_add(UC_HOOK_INSN, syscall, None, 1, 0, UC_X86_INS_SYSCALL)
        uc.reg_write(UC_X86_REG_RSP, STACK + 0x1000)
        uc.emu_start(BASE + labels["gate"], 0, count=10_000)
        assert seen == [(sc.SYS_futex, s) for s in states[:-1]] + [(sc.SYS_rt_sigreturn, states[-1])]
        assert uc.reg_read(UC_X86_REG_RSP) == STACK + 0x1000
