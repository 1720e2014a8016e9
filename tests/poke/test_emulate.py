"""textpoke.x86.emulate: jmp/push/call on a register frame, word sizes 8 and 4."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

import textpoke.x86 as x86
from textpoke import UsageError
from textpoke.x86.emulate import RegisterFrame, emulate_call, emulate_jmp, emulate_push


class DictMemory:
    """Byte-addressed memory that records each write."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}
        self.writes: list[tuple[int, bytes]] = []

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.bytes[addr + i] for i in range(n))

    def write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, bytes(data)))
        for i, byte in enumerate(data):
            self.bytes[addr + i] = byte


def test_package_exports_the_emulation() -> None:
    assert x86.emulate_call is emulate_call
    assert x86.emulate_push is emulate_push
    assert x86.emulate_jmp is emulate_jmp
    assert x86.RegisterFrame is RegisterFrame
    assert {"emulate_call", "emulate_push", "emulate_jmp", "RegisterFrame", "Memory"} <= set(
        x86.__all__
    )
    # What was exported before is still there.
    assert {"INT3", "NOP5", "encode_call", "decode_site"} <= set(x86.__all__)


@pytest.mark.parametrize("word_size", [0, 2, 16, -8])
def test_frame_refuses_other_word_sizes(word_size: int) -> None:
    with pytest.raises(UsageError, match="word_size"):
        RegisterFrame(ip=0x1000, sp=0x2000, word_size=word_size)


@pytest.mark.parametrize(
    ("ip", "sp", "word_size"),
    [(-1, 0, 8), (0, -8, 8), (2**64, 0, 8), (0, 2**64, 8), (2**32, 0, 4), (0, 2**32, 4)],
)
def test_frame_refuses_registers_outside_the_word(ip: int, sp: int, word_size: int) -> None:
    with pytest.raises(UsageError, match="does not fit"):
        RegisterFrame(ip=ip, sp=sp, word_size=word_size)


def test_frame_accepts_the_full_word_and_is_frozen() -> None:
    frame = RegisterFrame(ip=0xFFFF_FFFF, sp=0xFFFF_FFFC, word_size=4)
    assert frame.mask == 0xFFFF_FFFF
    assert RegisterFrame(ip=0, sp=0).mask == 2**64 - 1
    assert RegisterFrame(ip=0, sp=0).word_size == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.ip = 1  # type: ignore[misc]


def test_jmp_sets_ip_only() -> None:
    frame = RegisterFrame(ip=0x401001, sp=0x7FFC_0000_0010)
    assert emulate_jmp(frame, 0x402000) == RegisterFrame(ip=0x402000, sp=0x7FFC_0000_0010)
    assert frame.ip == 0x401001  # the input frame is untouched


def test_jmp_wraps_to_the_word() -> None:
    # A rel32 target computed in 64 bits past 4 GiB is a wrapped address on i386.
    frame = RegisterFrame(ip=0xFFFF_FFF1, sp=0x1000, word_size=4)
    assert emulate_jmp(frame, 0x1_0000_0015).ip == 0x15
    assert emulate_jmp(RegisterFrame(ip=1, sp=0), -16).ip == 2**64 - 16


def test_push_x86_64_stores_eight_little_endian_bytes_below_sp() -> None:
    memory = DictMemory()
    out = emulate_push(RegisterFrame(ip=0x401001, sp=0x7FFF_0010), memory, 0x1122_3344_5566_7788)
    assert out == RegisterFrame(ip=0x401001, sp=0x7FFF_0008)
    assert memory.writes == [(0x7FFF_0008, bytes.fromhex("8877665544332211"))]


def test_push_i386_stores_four_bytes_and_masks_the_value() -> None:
    memory = DictMemory()
    out = emulate_push(RegisterFrame(ip=0x8048001, sp=0xBFFF_F000, word_size=4), memory, 0x1_2345_6789)
    assert out == RegisterFrame(ip=0x8048001, sp=0xBFFF_EFFC, word_size=4)
    assert memory.writes == [(0xBFFF_EFFC, bytes.fromhex("89674523"))]


@pytest.mark.parametrize(
    ("word_size", "new_sp", "stored"),
    [(8, 2**64 - 8, b"\xff" * 8), (4, 2**32 - 4, b"\xff" * 4)],
)
def test_push_at_sp_zero_wraps_and_negative_values_mask(
    word_size: int, new_sp: int, stored: bytes
) -> None:
    memory = DictMemory()
    out = emulate_push(RegisterFrame(ip=0, sp=0, word_size=word_size), memory, -1)
    assert out.sp == new_sp
    assert memory.writes == [(new_sp, stored)]


def test_call_pushes_the_end_of_the_call_and_jumps() -> None:
    site = 0x40_1234
    memory = DictMemory()
    out = emulate_call(RegisterFrame(ip=site + 1, sp=0x7FFE_0000_0100), memory, 0x40_9000)
    assert out == RegisterFrame(ip=0x40_9000, sp=0x7FFE_0000_00F8)
    assert memory.writes == [(0x7FFE_0000_00F8, (site + 5).to_bytes(8, "little"))]


def test_call_i386_return_address_wraps() -> None:
    # A call in the last 5 bytes of the 32-bit space returns to address 2.
    memory = DictMemory()
    out = emulate_call(RegisterFrame(ip=0xFFFF_FFFE, sp=0x2000, word_size=4), memory, 0x100)
    assert out == RegisterFrame(ip=0x100, sp=0x1FFC, word_size=4)
    assert memory.writes == [(0x1FFC, bytes.fromhex("02000000"))]


@given(
    word_size=st.sampled_from([8, 4]),
    ip=st.integers(1, 2**32 - 1),
    sp=st.integers(0, 2**32 - 1),
    value=st.integers(-(2**70), 2**70),
    high=st.booleans(),
)
def test_push_property(word_size: int, ip: int, sp: int, value: int, high: bool) -> None:
    if high and word_size == 8:
        sp |= 0xFFFF_FFFF_0000_0000  # exercise the upper half on x86-64
    memory = DictMemory()
    out = emulate_push(RegisterFrame(ip=ip, sp=sp, word_size=word_size), memory, value)
    mod = 2 ** (8 * word_size)
    assert out.sp == (sp - word_size) % mod
    assert out.ip == ip
    assert memory.writes == [(out.sp, (value % mod).to_bytes(word_size, "little"))]
    assert int.from_bytes(memory.read(out.sp, word_size), "little") == value % mod
