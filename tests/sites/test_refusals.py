"""Refusals: files that are not x86-64 ELF, addresses that are not sites, changed bytes."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from textpoke import ElfError, NotABoundary, SiteError, SiteMismatch
from textpoke.sites import SiteKind, check_site, find_sites, open_elf
from textpoke.sites.discover import REASON_CALL, REASON_MCOUNT
from textpoke.x86.insn import NOP5

TARGETS = Path(__file__).resolve().parents[1] / "targets"


@pytest.fixture(scope="module")
def pie_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=False, pie=True)


@pytest.fixture(scope="module")
def fentry_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=True)


def _elf32_header(machine: int = 3) -> bytes:
    """A minimal ELF32 header (i386 by default): enough to be recognised as ELF."""
    ident = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)
    return ident + struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, 0, 0, 0, 0, 52, 32, 0, 40, 0, 0)


def _elf64_header(machine: int) -> bytes:
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    return ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, 0, 0, 0, 64, 56, 0, 64, 0, 0)


def test_not_an_elf(tmp_path: Path) -> None:
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(ElfError, match=r"script\.sh is not an ELF file") as info:
        open_elf(text)
    assert info.value.exit_code == 6 and info.value.hint
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ElfError, match="is not an ELF file"):
        find_sites(empty)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ElfError, match=f"no such file: {tmp_path}/nope"):
        open_elf(tmp_path / "nope")
    with pytest.raises(ElfError, match="is a directory"):
        open_elf(tmp_path)


def test_crafted_32_bit_elf(tmp_path: Path) -> None:
    path = tmp_path / "i386"
    path.write_bytes(_elf32_header())
    with pytest.raises(ElfError, match="is a 32-bit ELF file; textpoke patches x86-64"):
        open_elf(path)


def test_gcc_m32_object_is_refused(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed")
    obj = tmp_path / "leaf32.o"
    done = subprocess.run(
        ["gcc", "-m32", "-c", "-x", "c", "-", "-o", str(obj)],
        input="int leaf(int x) { return x + 1; }\n",
        text=True,
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip("gcc -m32 does not work here")
    with pytest.raises(ElfError, match="is a 32-bit ELF file"):
        find_sites(obj)


def test_other_machine_and_truncated(tmp_path: Path) -> None:
    arm = tmp_path / "aarch64"
    arm.write_bytes(_elf64_header(183))
    with pytest.raises(ElfError, match="for machine 183, not x86-64"):
        open_elf(arm)
    short = tmp_path / "short"
    short.write_bytes(b"\x7fELF\x02\x01")
    with pytest.raises(ElfError, match="truncated"):
        open_elf(short)


def test_relocatable_object_is_refused(tmp_path: Path) -> None:
    obj = tmp_path / "demo.o"
    subprocess.run(["gcc", "-O2", "-c", str(TARGETS / "sites_demo.c"), "-o", str(obj)], check=True)
    with pytest.raises(ElfError, match="of type ET_REL, not an executable or shared object"):
        open_elf(obj)


def _middle_calls(path: Path) -> list:
    return find_sites(path, kinds={SiteKind.CALL}, functions=["middle"])


def test_check_site_accepts_sites(pie_demo: Path, fentry_demo: Path) -> None:
    first, second = _middle_calls(pie_demo)
    assert check_site(pie_demo, first.address, first.insn) == first
    assert check_site(pie_demo, second.address, None).reason == REASON_CALL
    # With a load bias the address, the target and the boundary all move together.
    moved = check_site(pie_demo, first.address + 0x7000_0000, first.insn, 0x7000_0000)
    assert (moved.address, moved.target) == (first.address + 0x7000_0000, first.target + 0x7000_0000)  # type: ignore[operator]
    entry = next(s for s in find_sites(fentry_demo, kinds={SiteKind.FENTRY}) if s.function == "leaf")
    got = check_site(fentry_demo, entry.address, NOP5)
    assert (got.kind, got.reason, got.insn) == (SiteKind.FENTRY, REASON_MCOUNT, NOP5)


def test_not_a_boundary(pie_demo: Path) -> None:
    first, _ = _middle_calls(pie_demo)
    for inside in range(1, 5):
        with pytest.raises(NotABoundary, match=rf"{first.address + inside:#x} \(middle\+0x[0-9a-f]+\) is not an instruction start: it is inside `call") as info:
            check_site(pie_demo, first.address + inside, None)
        assert info.value.exit_code == 5


def test_not_a_site_instruction(pie_demo: Path) -> None:
    (middle,) = [f for f in open_elf(pie_demo).functions if f.name == "middle"]
    # `push %rbp` is an instruction boundary but not a 5-byte site.
    with pytest.raises(SiteError, match=r"middle\+0x0 holds `push") as info:
        check_site(pie_demo, middle.address, None)
    assert not isinstance(info.value, NotABoundary)


def test_mid_function_nop5_is_not_a_site(fentry_demo: Path) -> None:
    image = open_elf(fentry_demo)
    (probe,) = [f for f in image.functions if f.name == "probe"]
    code = image.read(probe.address, probe.size)
    assert code is not None
    mid = code.index(NOP5, 1)  # the asm nop5 after the entry nop5
    with pytest.raises(SiteError, match=r"probe\+0x[0-9a-f]+ is a nop5 inside the function body"):
        check_site(fentry_demo, probe.address + mid, NOP5)


def test_address_outside_functions(pie_demo: Path) -> None:
    with pytest.raises(SiteError, match="0x10 is not inside any function"):
        check_site(pie_demo, 0x10, None)


def test_bytes_mismatch(pie_demo: Path) -> None:
    first, _ = _middle_calls(pie_demo)
    with pytest.raises(SiteMismatch, match=rf"{first.address:#x} \(middle\+0x[0-9a-f]+\) holds e8 .* expected 0f 1f 44 00 00") as info:
        check_site(pie_demo, first.address, NOP5)
    assert info.value.hint and "list the sites again" in info.value.hint
    # The live bytes (as read from a process) are what is compared when given.
    with pytest.raises(SiteMismatch):
        check_site(pie_demo, first.address, first.insn, actual=NOP5)


def test_corrupted_copies_are_read_or_refused_never_a_traceback(fentry_demo: Path, tmp_path: Path) -> None:
    """Truncations and flipped bytes (headers, tables, .eh_frame, code): a result or an ElfError."""
    import random

    from textpoke import TextpokeError
    from textpoke.sites import scan_sites
    from textpoke.sites.elf import clear_cache

    rng = random.Random(11)
    original = fentry_demo.read_bytes()
    refused = 0
    for trial in range(80):
        data = bytearray(original)
        if trial % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randrange(1, 12)):
                at = rng.randrange(4096 if rng.random() < 0.5 else len(data))
                data[at] = rng.randrange(256)
        path = tmp_path / f"corrupt{trial}"
        path.write_bytes(bytes(data))
        clear_cache()
        try:
            scan = scan_sites(path, kinds={SiteKind.FENTRY, SiteKind.CALL, SiteKind.JMP})
            assert len(scan.sites) == len(scan.columns)
            scan_sites(path, kinds={SiteKind.CALL}, calls_to=["printf"])
        except TextpokeError as error:
            assert error.exit_code in (6, 12)
            refused += 1
    assert 0 < refused < 80
