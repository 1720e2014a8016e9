"""handle_int3, the specification: NOT_OURS cases, exact emulation, differential."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from textpoke import SiteError, UsageError
from textpoke.poke.spec import (
    NOT_OURS,
    SI_KERNEL,
    Emulated,
    NotOurs,
    TrapFrame,
    handle_int3,
)
from textpoke.x86.emulate import RegisterFrame, emulate_call, emulate_jmp
from textpoke.x86.insn import CALL_OPCODE, JMP_OPCODE, NOP5, InsnKind, encode_call, encode_jmp

from .fakes import encode, new_table, reference_effect

SITE = 0x40_1230
CALLEE = 0x40_9000
SP = 0x7FFD_0000_0100


class DictTable:
    """The smallest table handle_int3 accepts: a dict with lookup()."""

    def __init__(self, entries: dict[int, bytes]) -> None:
        self.entries = entries

    def lookup(self, addr: int) -> bytes | None:
        return self.entries.get(addr)


def trap(ip: int, *, sp: int = SP, si_code: int = SI_KERNEL, word_size: int = 8) -> TrapFrame:
    return TrapFrame(ip=ip, sp=sp, si_code=si_code, word_size=word_size)


def test_si_kernel_and_not_ours_values() -> None:
    assert SI_KERNEL == 0x80
    assert NOT_OURS is NotOurs.NOT_OURS
    assert len(NotOurs) == 1


@pytest.mark.parametrize("si_code", [0, 1, 2, 4, -6, 0x7F, 0x81])
def test_not_an_int3_is_not_ours(si_code: int) -> None:
    # TRAP_BRKPT (1), TRAP_TRACE (2), SI_USER (0), SI_TKILL (-6): never ours,
    # even with ip just past a site that is in the table.
    table = DictTable({SITE: encode_call(SITE, CALLEE)})
    assert handle_int3(trap(SITE + 1, si_code=si_code), table) is NOT_OURS


@pytest.mark.parametrize("ip", [SITE, SITE + 2, SITE + 5, SITE + 6, 1, 0])
def test_addresses_next_to_a_site_are_not_ours(ip: int) -> None:
    # ip == SITE means an int3 at SITE - 1; SITE + 2 an int3 inside the site.
    table = DictTable({SITE: encode_call(SITE, CALLEE)})
    assert handle_int3(trap(ip), table) is NOT_OURS
    sited = new_table(16)
    sited.publish(SITE, encode_call(SITE, CALLEE))
    assert handle_int3(trap(ip), sited) is NOT_OURS


def test_empty_table_is_not_ours() -> None:
    assert handle_int3(trap(SITE + 1), DictTable({})) is NOT_OURS
    assert handle_int3(trap(SITE + 1), new_table(8)) is NOT_OURS


@pytest.mark.parametrize("make_table", ["dict", "site_table"])
def test_exact_effects_of_nop_jmp_call(make_table: str) -> None:
    entries = {
        SITE: NOP5,
        SITE + 0x40: encode_jmp(SITE + 0x40, 0x40_0800),
        SITE + 0x80: encode_call(SITE + 0x80, CALLEE),
    }
    if make_table == "dict":
        table: object = DictTable(entries)
    else:
        table = new_table(16)
        for site, insn in entries.items():
            table.publish(site, insn)  # type: ignore[attr-defined]
    assert handle_int3(trap(SITE + 1), table) == Emulated(ip=SITE + 5, sp=SP, stores=())  # type: ignore[arg-type]
    assert handle_int3(trap(SITE + 0x41), table) == Emulated(ip=0x40_0800, sp=SP, stores=())  # type: ignore[arg-type]
    assert handle_int3(trap(SITE + 0x81), table) == Emulated(  # type: ignore[arg-type]
        ip=CALLEE, sp=SP - 8, stores=((SP - 8, SITE + 0x85),)
    )


def test_i386_call_wraps_like_the_cpu() -> None:
    # call at 0xfffffff0 with rel32 0x20: 0xfffffff5 + 0x20 wraps to 0x15.
    site = 0xFFFF_FFF0
    insn = bytes([CALL_OPCODE]) + struct.pack("<i", 0x20)
    result = handle_int3(trap(site + 1, sp=0x3000, word_size=4), DictTable({site: insn}))
    assert result == Emulated(ip=0x15, sp=0x2FFC, stores=((0x2FFC, 0xFFFF_FFF5),))
    # jmp backwards past 0 on i386 wraps to the top.
    low = 0x10
    back = bytes([JMP_OPCODE]) + struct.pack("<i", -0x40)
    assert handle_int3(trap(low + 1, word_size=4, sp=0x3000), DictTable({low: back})) == Emulated(
        ip=0xFFFF_FFD5, sp=0x3000, stores=()
    )


def test_trap_frame_is_validated_and_frozen() -> None:
    with pytest.raises(UsageError):
        TrapFrame(ip=2**32, sp=0, si_code=SI_KERNEL, word_size=4)
    with pytest.raises(UsageError):
        TrapFrame(ip=1, sp=0, si_code=SI_KERNEL, word_size=2)
    frame = trap(SITE + 1)
    assert frame.registers() == RegisterFrame(ip=SITE + 1, sp=SP)
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.ip = 0  # type: ignore[misc]


def test_undecodable_entry_is_refused_loudly() -> None:
    # apply_batch never publishes such bytes; the spec says so instead of guessing.
    with pytest.raises(SiteError):
        handle_int3(trap(SITE + 1), DictTable({SITE: bytes.fromhex("9090909090")}))


class DictMemory:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, addr: int, n: int) -> bytes:
        raise AssertionError("no reads")

    def write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, bytes(data)))


@st.composite
def frames_and_sites(draw: st.DrawFn) -> tuple[int, int, int, InsnKind, int]:
    word_size = draw(st.sampled_from([8, 4]))
    top = 2 ** (8 * word_size)
    site = draw(st.integers(1, min(top, 2**48) - 6))
    target = draw(st.integers(max(0, site + 5 - 2**31), min(top - 1, site + 5 + 2**31 - 1)))
    sp = draw(st.integers(0, top - 1))
    kind = draw(st.sampled_from(list(InsnKind)))
    return word_size, site, sp, kind, target


@given(case=frames_and_sites(), si_code=st.sampled_from([SI_KERNEL, SI_KERNEL, 1]))
def test_differential_against_direct_emulation(
    case: tuple[int, int, int, InsnKind, int], si_code: int
) -> None:
    word_size, site, sp, kind, target = case
    insn = encode(kind, site, target)
    result = handle_int3(
        TrapFrame(ip=site + 1, sp=sp, si_code=si_code, word_size=word_size), DictTable({site: insn})
    )
    if si_code != SI_KERNEL:
        assert result is NOT_OURS
        return
    assert isinstance(result, Emulated)
    # (a) the emulate_* helpers applied directly
    regs = RegisterFrame(ip=site + 1, sp=sp, word_size=word_size)
    memory = DictMemory()
    if kind is InsnKind.NOP:
        direct = emulate_jmp(regs, site + 5)
    elif kind is InsnKind.JMP:
        direct = emulate_jmp(regs, target)
    else:
        direct = emulate_call(regs, memory, target)
    assert (result.ip, result.sp) == (direct.ip, direct.sp)
    assert result.stores == tuple(
        (addr, int.from_bytes(data, "little")) for addr, data in memory.writes
    )
    # (b) the hand-written reference
    assert result == reference_effect(site, insn, sp=sp, word_size=word_size)
    # and a trap one byte off is never ours
    assert handle_int3(
        TrapFrame(ip=site + 2, sp=sp, si_code=si_code, word_size=word_size), DictTable({site: insn})
    ) is NOT_OURS
