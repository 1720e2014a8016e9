"""target/maps.py: parsing /proc/PID/maps, the load bias, free room near code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from textpoke import NoSuchProcess, TargetError
from textpoke.target.maps import (
    DEFAULT_REACH,
    PAGE_SIZE,
    Mapping,
    find_free_near,
    load_base,
    parse_maps,
    read_maps,
)

# A PIE: first PT_LOAD at p_vaddr 0, text in the second mapping (offset 0x1000).
PIE_MAPS = """\
55d0c8a00000-55d0c8a01000 r--p 00000000 fe:00 1234                       /opt/demo/bin/app
55d0c8a01000-55d0c8a02000 r-xp 00001000 fe:00 1234                       /opt/demo/bin/app
55d0c8a02000-55d0c8a03000 r--p 00002000 fe:00 1234                       /opt/demo/bin/app
55d0c8a03000-55d0c8a04000 rw-p 00002000 fe:00 1234                       /opt/demo/bin/app
55d0c9000000-55d0c9021000 rw-p 00000000 00:00 0                          [heap]
7f1a2c000000-7f1a2c028000 r--p 00000000 fe:00 5678                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f1a2c028000-7f1a2c19d000 r-xp 00028000 fe:00 5678                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f1a2c400000-7f1a2c401000 rw-s 00000000 00:01 99                         /memfd:ring with spaces (deleted)
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0                          [stack]
7ffd1c1fe000-7ffd1c200000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""

# A classic non-PIE: linked at 0x400000 and mapped there, so its bias is 0.
NON_PIE_MAPS = """\
00400000-00401000 r--p 00000000 08:01 42   /usr/bin/tool
00401000-00402000 r-xp 00001000 08:01 42   /usr/bin/tool
00403000-00404000 rw-p 00002000 08:01 42   /usr/bin/tool
"""


def test_parse_maps_fields_and_properties() -> None:
    maps = parse_maps(PIE_MAPS)
    assert len(maps) == 11
    text = maps[1]
    assert text == Mapping(
        start=0x55D0C8A01000,
        end=0x55D0C8A02000,
        perms="r-xp",
        offset=0x1000,
        dev="fe:00",
        inode=1234,
        path="/opt/demo/bin/app",
    )
    assert (text.readable, text.writable, text.executable, text.size) == (True, False, True, 0x1000)
    heap = maps[4]
    assert (heap.path, heap.inode, heap.writable, heap.executable) == ("[heap]", 0, True, False)
    ring = maps[7]
    # Spaces inside the path survive; the " (deleted)" suffix is recognised.
    assert ring.path == "/memfd:ring with spaces (deleted)"
    assert ring.deleted and ring.file_path == "/memfd:ring with spaces"
    assert ring.shared
    assert maps[-1].start == 0xFFFFFFFFFF600000


def test_parse_maps_anonymous_line_without_path() -> None:
    (m,) = parse_maps("7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n")
    assert (m.path, m.inode, m.size) == ("", 0, PAGE_SIZE)


def test_parse_maps_rejects_garbage() -> None:
    with pytest.raises(TargetError, match="line 2 is malformed"):
        parse_maps("00400000-00401000 r--p 00000000 08:01 42 /x\nnot a maps line\n")


def test_load_base_pie_is_the_offset_zero_mapping() -> None:
    maps = parse_maps(PIE_MAPS)
    assert load_base(maps, "/opt/demo/bin/app", link_vaddr=0) == 0x55D0C8A00000
    # A library whose offset-0 PT_LOAD is linked at a nonzero page (prelinked style).
    assert load_base(maps, "/usr/lib/x86_64-linux-gnu/libc.so.6", link_vaddr=0x3000) == 0x7F1A2BFFD000


def test_load_base_non_pie_is_zero_not_the_mapping_start() -> None:
    assert load_base(parse_maps(NON_PIE_MAPS), "/usr/bin/tool", link_vaddr=0x400000) == 0


def test_load_base_rounds_the_link_vaddr_down_to_a_page() -> None:
    assert load_base(parse_maps(NON_PIE_MAPS), "/usr/bin/tool", link_vaddr=0x400040) == 0


def test_load_base_of_a_deleted_file_matches_its_plain_path() -> None:
    text = NON_PIE_MAPS.replace("/usr/bin/tool", "/usr/bin/tool (deleted)")
    assert load_base(parse_maps(text), "/usr/bin/tool", link_vaddr=0x400000) == 0


def test_load_base_of_an_unmapped_file_is_refused() -> None:
    with pytest.raises(TargetError, match="/nowhere is not mapped"):
        load_base(parse_maps(PIE_MAPS), "/nowhere", link_vaddr=0)


def test_load_base_reads_the_link_vaddr_from_the_file() -> None:
    # This interpreter really is mapped in this process; its bias must map its
    # entry point into an executable mapping of the same file.
    maps = read_maps(os.getpid())
    exe = os.readlink("/proc/self/exe")
    base = load_base(maps, exe)
    from elftools.elf.elffile import ELFFile

    with open(exe, "rb") as f:
        entry = ELFFile(f)["e_entry"]
    (owner,) = [m for m in maps if m.start <= entry + base < m.end]
    assert owner.file_path == exe and owner.executable


def test_find_free_near_takes_the_closest_gap() -> None:
    maps = parse_maps(NON_PIE_MAPS)
    # Free: [0x10000, 0x400000), the one-page hole [0x402000, 0x403000), and from
    # 0x404000 up.  "Closest" is by the farthest byte of the range from addr.
    # Two pages just below the binary (farthest byte 0x3000 away) beat two pages
    # after it (0x4fff away).
    assert find_free_near(maps, 0x401000, 0x2000) == 0x3FE000
    # One page: the hole between the mappings is closest.
    assert find_free_near(maps, 0x401800, 0x1000) == 0x402000
    # Sizes are rounded up to pages: 0x1001 bytes need two pages, which the hole
    # cannot hold.
    assert find_free_near(maps, 0x401800, 0x1001) == 0x3FE000


def test_find_free_near_respects_reach_on_every_byte() -> None:
    maps = parse_maps(
        "00400000-00500000 r-xp 00000000 08:01 42 /a\n"
        "00501000-7ff000000000 rw-p 00000000 00:00 0\n"
    )
    # With reach 0x50000 around 0x4c0000 only the one-page hole at 0x500000 is
    # reachable: the low gap ends at 0x400000, 0xc0000 away.
    assert find_free_near(maps, 0x4C0000, 0x1000, reach=0x50000) == 0x500000
    with pytest.raises(TargetError, match="no free 0x2000-byte range within 0x50000 bytes of 0x4c0000"):
        find_free_near(maps, 0x4C0000, 0x2000, reach=0x50000)
    # With the default reach the top two pages of the low gap are the closest.
    assert find_free_near(maps, 0x4C0000, 0x2000) == 0x3FE000
    # The range may end exactly at addr + reach (inclusive) and no further.
    assert find_free_near(maps, 0x4FF000, 0x1000, reach=0x1FFF) == 0x500000
    with pytest.raises(TargetError):
        find_free_near(maps, 0x4FF000, 0x1000, reach=0x1FFE)


def test_find_free_near_keeps_heap_and_stack_growth_room() -> None:
    # Everything below the binary is taken: the nearest room is past [heap] plus
    # the 256 MiB left free for brk.
    heap_side = parse_maps(
        "00010000-555500000000 rw-p 00000000 00:00 0\n"
        "555500000000-555500001000 r-xp 00000000 08:01 42 /a\n"
        "555500001000-555500100000 rw-p 00000000 00:00 0 [heap]\n"
    )
    assert find_free_near(heap_side, 0x555500000000, PAGE_SIZE) == 0x555500100000 + 256 * 2**20
    # Only room below [stack]: 64 MiB under it stay free for the stack to grow.
    stack_side = parse_maps(
        "00010000-7ff000000000 rw-p 00000000 00:00 0\n"
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n"
        "7ffd00021000-7ffffffff000 rw-p 00000000 00:00 0\n"
    )
    assert find_free_near(stack_side, 0x7FFD00000000, PAGE_SIZE) == 0x7FFD00000000 - 64 * 2**20 - PAGE_SIZE
    # In the PIE layout the page right below the binary is the closest.
    assert find_free_near(parse_maps(PIE_MAPS), 0x55D0C8A01000, PAGE_SIZE) == 0x55D0C89FF000


def test_find_free_near_result_is_within_reach_and_free() -> None:
    maps = parse_maps(PIE_MAPS)
    for addr in (0x55D0C8A01234, 0x7F1A2C028000, 0x7F1A2C19CFFF):
        start = find_free_near(maps, addr, 0x3000)
        assert start % PAGE_SIZE == 0
        assert abs(start - addr) <= DEFAULT_REACH and abs(start + 0x3000 - 1 - addr) <= DEFAULT_REACH
        assert all(start + 0x3000 <= m.start or start >= m.end for m in maps)


def test_read_maps_of_self_and_of_a_missing_pid() -> None:
    maps = read_maps(os.getpid())
    assert any(m.executable and m.file_path == os.readlink("/proc/self/exe") for m in maps)
    with open("/proc/sys/kernel/pid_max") as f:
        beyond = int(f.read()) + 1
    with pytest.raises(NoSuchProcess, match=f"no process with pid {beyond}") as info:
        read_maps(beyond)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_read_maps_of_an_exited_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(NoSuchProcess):
        read_maps(proc.pid)
