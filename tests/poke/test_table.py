"""The in-flight table: byte layout, hash, probing, load limit, buffers."""

from __future__ import annotations

import mmap
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from textpoke import PatchError, UsageError
from textpoke.poke.table import (
    HASH_MULTIPLIER,
    SiteTable,
    pack_insn,
    table_slot,
    unpack_insn,
)
from textpoke.x86.insn import NOP5, encode_call, encode_jmp

from .fakes import new_table

INSN_A = bytes.fromhex("e811223344")
INSN_B = bytes.fromhex("e9aabbccdd")


def colliding(capacity: int, home: int, count: int, *, start: int = 0x40_0000) -> list[int]:
    """``count`` addresses whose home slot is ``home`` in a table of ``capacity``."""
    bits = capacity.bit_length() - 1
    found = []
    addr = start
    while len(found) < count:
        if ((addr * 0x9E3779B97F4A7C15) % 2**64) >> (64 - bits) == home:
            found.append(addr)
        addr += 1
    return found


def entry_at(buffer: bytes | bytearray, slot: int) -> tuple[int, int]:
    return struct.unpack_from("<QQ", buffer, 16 * slot)


def test_hash_constant_and_known_slots() -> None:
    assert HASH_MULTIPLIER == 0x9E3779B97F4A7C15
    # 0x9E37... = 0b1001_1110...: its top 3 bits are 0b100, top 8 bits 0x9E.
    assert table_slot(1, 3) == 4
    assert table_slot(1, 8) == 0x9E
    assert table_slot(2, 8) == 0x3C  # 2 * C wraps: 0x3C6E... mod 2**64
    assert table_slot(0x1000, 4) == 0x7  # C << 12 drops 0x9E3: 0x779B...
    assert table_slot(0, 12) == 0
    assert table_slot(1, 64) == 0x9E3779B97F4A7C15
    assert table_slot(0xFFFF_FFFF_FFFF_FFFF, 4) == 0x6  # -C mod 2**64 = 0x61C8...


@given(addr=st.integers(1, 2**64 - 1), bits=st.integers(1, 20))
def test_slot_matches_the_contract_formula(addr: int, bits: int) -> None:
    table = new_table(1 << bits) if bits <= 10 else None
    expected = ((addr * 0x9E3779B97F4A7C15) % 2**64) >> (64 - bits)
    assert table_slot(addr, bits) == expected
    assert 0 <= expected < 2**bits
    if table is not None:
        assert table.slot_of(addr) == expected


@pytest.mark.parametrize("capacity", [0, 1, 3, 6, 12, -4])
def test_capacity_must_be_a_power_of_two(capacity: int) -> None:
    with pytest.raises(UsageError, match="power of two"):
        SiteTable.size_for(capacity)
    with pytest.raises(UsageError):
        SiteTable(bytearray(1024), capacity=capacity)


def test_size_and_limits() -> None:
    assert SiteTable.size_for(8) == 128
    assert SiteTable.size_for(4096) == 65536
    table = new_table(8)
    assert (table.capacity, table.bits, table.max_entries, table.headroom, len(table)) == (
        8,
        3,
        6,
        6,
        0,
    )


def test_buffer_checks() -> None:
    with pytest.raises(UsageError, match="read-only"):
        SiteTable(bytes(128), capacity=8)
    with pytest.raises(UsageError, match="127 bytes, 128 needed"):
        SiteTable(bytearray(127), capacity=8)
    with pytest.raises(UsageError, match="aligned"):
        SiteTable(memoryview(bytearray(256))[4:], capacity=8)
    with pytest.raises(UsageError, match="buffer protocol"):
        SiteTable([0] * 16, capacity=8)
    # A larger buffer is fine: the table uses its first size_for() bytes.
    big = bytearray(512)
    SiteTable(big, capacity=8).publish(0x1234, INSN_A)
    assert big[128:] == bytes(384)


def test_entry_layout_is_addr_then_insn_low_40_bits() -> None:
    buffer = bytearray(SiteTable.size_for(16))
    table = SiteTable(buffer, capacity=16)
    site = 0x7F12_3456_789A
    table.publish(site, INSN_A)
    slot = table_slot(site, 4)
    expected = bytearray(256)
    expected[16 * slot : 16 * slot + 16] = site.to_bytes(8, "little") + INSN_A + bytes(3)
    assert buffer == expected
    assert entry_at(buffer, slot) == (site, 0x44_3322_11E8)
    assert pack_insn(INSN_A) == 0x44_3322_11E8
    assert unpack_insn(0xFFFF_FF44_3322_11E8) == INSN_A  # high bits ignored


def test_collisions_probe_linearly_and_wrap() -> None:
    buffer = bytearray(SiteTable.size_for(8))
    table = SiteTable(buffer, capacity=8)
    first, second, third, absent = colliding(8, 7, 4)
    for site, insn in ((first, INSN_A), (second, INSN_B), (third, NOP5)):
        table.publish(site, insn)
        assert table.slot_of(site) == 7
    # Home slot 7 is the last: the probe wraps to 0, then 1.
    assert entry_at(buffer, 7)[0] == first
    assert entry_at(buffer, 0)[0] == second
    assert entry_at(buffer, 1)[0] == third
    assert [entry_at(buffer, s)[0] for s in (2, 3, 4, 5, 6)] == [0] * 5
    assert (table.lookup(first), table.lookup(second), table.lookup(third)) == (
        INSN_A,
        INSN_B,
        NOP5,
    )
    # An absent address with the same home slot probes 7, 0, 1 and stops at 2.
    assert table.lookup(absent) is None
    assert absent not in table
    # One whose home is slot 0 (taken by `second`) must probe past it too.
    (home0,) = colliding(8, 0, 1)
    assert table.lookup(home0) is None
    table.publish(home0, INSN_B)
    assert entry_at(buffer, 2)[0] == home0
    assert table.lookup(home0) == INSN_B
    assert len(table) == 4


class RecordingTable(SiteTable):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stores: list[tuple[int, int]] = []

    def _store_word(self, index: int, value: int) -> None:
        self.stores.append((index, value))
        super()._store_word(index, value)


def test_new_entry_stores_insn_before_addr_and_update_only_insn() -> None:
    table = RecordingTable(bytearray(SiteTable.size_for(8)), capacity=8)
    site = 0x40_1005
    slot = table.slot_of(site)
    table.publish(site, INSN_A)
    assert table.stores == [(2 * slot + 1, pack_insn(INSN_A)), (2 * slot, site)]
    table.stores.clear()
    table.publish(site, INSN_B)
    assert table.stores == [(2 * slot + 1, pack_insn(INSN_B))]
    assert table.lookup(site) == INSN_B
    assert len(table) == 1


def test_full_table_refuses_new_sites_but_updates_existing_ones() -> None:
    buffer = bytearray(SiteTable.size_for(8))
    table = SiteTable(buffer, capacity=8)
    sites = [0x40_1000 + 16 * i for i in range(7)]
    for site in sites[:6]:
        table.publish(site, INSN_A)
    assert (len(table), table.headroom) == (6, 0)
    before = bytes(buffer)
    with pytest.raises(PatchError, match=f"{sites[6]:#x}"):
        table.publish(sites[6], INSN_A)
    assert bytes(buffer) == before
    table.publish(sites[0], INSN_B)
    assert table.lookup(sites[0]) == INSN_B
    assert table.lookup(sites[6]) is None
    assert len(table) == 6


def test_bad_arguments() -> None:
    table = new_table(8)
    with pytest.raises(UsageError, match="site address"):
        table.publish(0, INSN_A)
    with pytest.raises(UsageError, match="site address"):
        table.publish(2**64, INSN_A)
    with pytest.raises(UsageError, match="5 instruction bytes"):
        table.publish(0x1000, INSN_A[:4])
    assert table.lookup(0) is None
    assert table.lookup(-5) is None
    assert table.lookup(2**64) is None
    assert "0x1000" not in table
    assert len(table) == 0


def test_existing_buffer_is_adopted() -> None:
    buffer = bytearray(SiteTable.size_for(16))
    first = SiteTable(buffer, capacity=16)
    first.publish(0x40_1000, INSN_A)
    first.publish(0x40_2000, INSN_B)
    again = SiteTable(buffer, capacity=16)
    assert len(again) == 2
    assert again.headroom == 10
    assert again.as_dict() == {0x40_1000: INSN_A, 0x40_2000: INSN_B}


def test_entries_are_in_slot_order() -> None:
    table = new_table(16)
    sites = [0x40_1000 + 5 * i for i in range(10)]
    for i, site in enumerate(sites):
        table.publish(site, encode_call(site, 0x50_0000 + i))
    listed = list(table.entries())
    assert sorted(listed) == sorted((s, encode_call(s, 0x50_0000 + i)) for i, s in enumerate(sites))
    positions = [
        next(slot for slot in range(16) if table._words[2 * slot] == site) for site, _ in listed
    ]
    assert positions == sorted(positions)


def _publish_sequence(table: SiteTable) -> None:
    for i in range(24):
        site = 0x40_0000 + 0x35 * i
        table.publish(site, encode_jmp(site, 0x40_8000 + i) if i % 2 else NOP5)
    table.publish(0x40_0000, INSN_A)  # an update


def test_numpy_mmap_and_bytearray_buffers_hold_identical_bytes() -> None:
    size = SiteTable.size_for(32)
    as_bytearray = bytearray(size)
    as_numpy = np.zeros(size // 8, dtype=np.uint64)
    as_mmap = mmap.mmap(-1, size)
    try:
        for buffer in (as_bytearray, as_numpy, as_mmap):
            _publish_sequence(SiteTable(buffer, capacity=32))
        assert as_numpy.tobytes() == bytes(as_bytearray)
        assert as_mmap[:] == bytes(as_bytearray)
        assert bytes(as_bytearray) != bytes(size)
    finally:
        as_mmap.close()


@given(
    data=st.dictionaries(
        st.integers(1, 2**64 - 1),
        st.binary(min_size=5, max_size=5),
        max_size=24,
    ),
    absent=st.lists(st.integers(1, 2**64 - 1), max_size=8),
)
def test_table_behaves_like_a_dict(data: dict[int, bytes], absent: list[int]) -> None:
    buffer = bytearray(SiteTable.size_for(32))
    table = SiteTable(buffer, capacity=32)
    for site, insn in data.items():
        table.publish(site, insn)
    assert len(table) == len(data)
    assert table.as_dict() == data
    for site, insn in data.items():
        assert table.lookup(site) == insn
        assert site in table
    for site in absent:
        if site not in data:
            assert table.lookup(site) is None
    # Every used slot holds a published address and each lies on its probe path:
    # no empty slot between its home slot and where it is.
    for slot in range(32):
        addr = entry_at(buffer, slot)[0]
        if addr:
            home = table_slot(addr, 5)
            walk = home
            while walk != slot:
                assert entry_at(buffer, walk)[0] != 0
                walk = (walk + 1) % 32
