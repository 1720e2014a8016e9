"""sites: fentry and call/jmp sites of files, checked against objdump and known code."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from textpoke.sites import SiteKind, check_site, find_sites, open_elf, scan_sites
from textpoke.sites.discover import REASON_CALL, REASON_JMP, REASON_MCOUNT
from textpoke.sites.elf import clear_cache
from textpoke.x86.insn import CALL_OPCODE, CALL_SIZE, JMP_OPCODE, NOP5

from .conftest import objdump

#: The functions tests/targets/sites_demo.c defines (each gets one fentry site).
DEMO_FUNCTIONS = {"leaf", "middle", "via_pointer", "probe", "main"}
PYTHON = Path("/usr/bin/python3")


@pytest.fixture(scope="module")
def fentry_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=True)


@pytest.fixture(scope="module")
def pie_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=False, pie=True)


def _oracle_sites(path: Path, opcode: int) -> set[tuple[int, str | None]]:
    """(address, target name) of every 5-byte rel32 instruction objdump decodes
    inside a symbol-table function of ``path``."""
    image = open_elf(path)
    return {
        (insn.address, insn.target_name)
        for insn in objdump(path)
        if len(insn.raw) == CALL_SIZE
        and insn.raw[0] == opcode
        and image.function_at(insn.address) is not None
    }


def test_fentry_sites_are_exactly_the_defined_functions(fentry_demo: Path) -> None:
    sites = find_sites(fentry_demo, kinds={SiteKind.FENTRY})
    assert {s.function for s in sites} == DEMO_FUNCTIONS
    assert len(sites) == len(DEMO_FUNCTIONS)
    image = open_elf(fentry_demo)
    for site in sites:
        assert site.insn == NOP5
        assert site.offset_in_function == 0
        assert site.address == image.function_starting_at(site.address).address  # type: ignore[union-attr]
        assert site.reason == REASON_MCOUNT
        assert (site.target, site.target_name) == (None, None)
    # The non-PIE build is linked at 0x400000: addresses are absolute.
    assert image.is_pie is False and image.link_vaddr == 0x400000
    assert min(s.address for s in sites) > 0x400000


def test_fentry_sites_match_objdump(fentry_demo: Path) -> None:
    image = open_elf(fentry_demo)
    # nop5s inside functions (objdump also shows the alignment padding between them).
    starts = {
        insn.address
        for insn in objdump(fentry_demo)
        if insn.raw == NOP5 and image.function_at(insn.address) is not None
    }
    sites = {s.address for s in find_sites(fentry_demo, kinds={SiteKind.FENTRY})}
    # probe's mid-body nop5 is not a fentry site.
    (probe,) = [f for f in image.functions if f.name == "probe"]
    mid_body = {a for a in starts if probe.address < a < probe.end}
    assert len(mid_body) == 1
    assert sites == starts - mid_body


@pytest.mark.parametrize("build", ["fentry_demo", "pie_demo"])
def test_call_sites_match_objdump(build: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(build)
    sites = find_sites(path, kinds={SiteKind.CALL})
    assert {(s.address, s.target_name) for s in sites} == _oracle_sites(path, CALL_OPCODE)
    for site in sites:
        assert site.kind is SiteKind.CALL and site.insn[0] == CALL_OPCODE and len(site.insn) == CALL_SIZE
        assert site.reason == REASON_CALL


@pytest.mark.parametrize("build", ["fentry_demo", "pie_demo"])
def test_jmp_sites_match_objdump(build: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(build)
    sites = find_sites(path, kinds={SiteKind.JMP})
    assert {(s.address, s.target_name) for s in sites} == _oracle_sites(path, JMP_OPCODE)
    assert all(s.reason == REASON_JMP and s.insn[0] == JMP_OPCODE for s in sites)


@pytest.mark.parametrize("build", ["fentry_demo", "pie_demo"])
def test_known_call_counts(build: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(build)
    image = open_elf(path)
    leaf = image.functions[[f.name for f in image.functions].index("leaf")]
    middle = find_sites(path, kinds={SiteKind.CALL}, functions=["middle"])
    assert [(s.function, s.target, s.target_name) for s in middle] == [("middle", leaf.address, "leaf")] * 2
    # The indirect call through the function pointer is not a site.
    assert find_sites(path, kinds={SiteKind.CALL, SiteKind.JMP}, functions=["via_pointer"]) == []
    assert find_sites(path, kinds={SiteKind.CALL}, functions=["leaf", "probe"]) == []
    main_callees = [s.target_name for s in find_sites(path, kinds={SiteKind.CALL}, functions=["main"])]
    assert main_callees[:3] == ["middle", "via_pointer", "probe"]
    assert {"printf@plt", "strcmp@plt", "fflush@plt", "pause@plt"} <= set(main_callees)


def test_pie_build_is_relative_and_base_relocates(pie_demo: Path) -> None:
    image = open_elf(pie_demo)
    assert image.is_pie and image.link_vaddr == 0
    assert not image.has_mcount_section
    link = find_sites(pie_demo)
    moved = find_sites(pie_demo, base=0x5555_5555_4000)
    assert [s.address + 0x5555_5555_4000 for s in link] == [s.address for s in moved]
    assert [s.target + 0x5555_5555_4000 for s in link] == [s.target for s in moved]  # type: ignore[operator]
    # Plain PIE code has no fentry nops: no fentry site.
    assert not any(s.kind is SiteKind.FENTRY for s in link)


def test_globs_over_functions_and_callees(pie_demo: Path) -> None:
    in_m = find_sites(pie_demo, kinds={SiteKind.CALL}, functions=["m*"])
    assert {s.function for s in in_m} == {"main", "middle"}
    to_leaf = find_sites(pie_demo, calls_to=["leaf"])
    assert [(s.function, s.target_name) for s in to_leaf] == [("middle", "leaf")] * 2
    # "printf" matches "printf@plt"; fentry sites have no callee so none come back.
    to_printf = find_sites(pie_demo, kinds=set(SiteKind), calls_to=["printf"])
    assert len(to_printf) == 2 and {s.target_name for s in to_printf} == {"printf@plt"}
    assert find_sites(pie_demo, calls_to=["p?use*"]) == find_sites(pie_demo, calls_to=["pause@plt"])


def test_shared_object_mcount_loc_from_relative_relocations(sites_lib: Path, tmp_path: Path) -> None:
    sites = find_sites(sites_lib)
    assert [(s.kind, s.function, s.offset_in_function) for s in sites if s.kind is SiteKind.FENTRY] == [
        (SiteKind.FENTRY, "lib_leaf", 0),
        (SiteKind.FENTRY, "lib_twice", 0),
    ]
    calls = [s for s in sites if s.kind is SiteKind.CALL]
    assert [(s.function, s.target_name) for s in calls] == [("lib_twice", "lib_leaf@plt")] * 2
    # The addresses come from R_X86_64_RELATIVE addends: zero the section's bytes
    # (as a linker may leave them) and the same sites must be found.
    copy = tmp_path / "libzeroed.so"
    shutil.copyfile(sites_lib, copy)
    from elftools.elf.elffile import ELFFile

    with open(copy, "r+b") as f:
        section = ELFFile(f).get_section_by_name("__mcount_loc")
        offset, size = section["sh_offset"], section["sh_size"]
        assert size == 16
        f.seek(offset)
        f.write(bytes(size))
    clear_cache()
    assert find_sites(copy) == sites


def test_python3_call_sites(tmp_path: Path) -> None:
    if not PYTHON.exists():
        pytest.skip("/usr/bin/python3 is not installed")
    clear_cache()
    began = time.perf_counter()
    scan = scan_sites(PYTHON, kinds={SiteKind.CALL})
    elapsed = time.perf_counter() - began
    assert elapsed < 10, f"scanning {PYTHON} took {elapsed:.1f}s"
    assert len(scan.sites) >= 2000
    names = {s.target_name for s in scan.sites}
    if "malloc@plt" not in open_elf(PYTHON).plt.values():
        pytest.skip("this python3 does not call malloc through its PLT")
    assert "malloc@plt" in names
    # Spot-check against objdump over the first functions with sites.
    first = scan.sites[0].function
    image = open_elf(PYTHON)
    fn = next(f for f in image.functions if f.name == first)
    window_end = fn.address + 0x2000
    oracle = {
        # objdump prints dynamic symbols with their version ("PyErr_SetString@@Base").
        (i.address, i.target_name.split("@@")[0] if i.target_name else None)
        for i in objdump(PYTHON, start=fn.address, stop=window_end)
        if len(i.raw) == CALL_SIZE and i.raw[0] == CALL_OPCODE
        and (owner := image.function_at(i.address)) is not None and owner.end <= window_end
    }
    ours = {
        (s.address, s.target_name)
        for s in scan.sites
        if fn.address <= s.address and (owner := image.function_at(s.address)) and owner.end <= window_end
    }
    # objdump names targets by nearest symbol: compare addresses, and names of
    # targets that are function starts or PLT stubs.
    assert {a for a, _ in ours} == {a for a, _ in oracle}
    # Unnamed functions of the stripped python3 are sub_<address> here (from .eh_frame).
    assert {(a, n) for a, n in ours if n and "+" not in n and not n.startswith("sub_")} <= oracle
    # Every site passes the independent single-address check.
    for site in scan.sites[:: max(len(scan.sites) // 50, 1)]:
        assert check_site(PYTHON, site.address, site.insn) == site


def test_cache_is_per_file_identity(pie_demo: Path, tmp_path: Path) -> None:
    clear_cache()
    first = open_elf(pie_demo)
    link = tmp_path / "alias"
    os.symlink(pie_demo, link)
    second = open_elf(link)
    assert second.path == str(link) and second.functions is first.functions


def _patched_copy(src: Path, dst: Path, address: int, data: bytes) -> Path:
    """A copy of ``src`` with ``data`` written at link-time ``address`` of its code."""
    from elftools.elf.elffile import ELFFile

    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        (offset,) = [
            address - seg["p_vaddr"] + seg["p_offset"]
            for seg in ELFFile(f).iter_segments()
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= address < seg["p_vaddr"] + seg["p_filesz"]
        ]
        f.seek(offset)
        f.write(data)
    clear_cache()
    return dst


def test_undecodable_function_is_skipped_and_counted(pie_demo: Path, tmp_path: Path) -> None:
    (middle,) = [f for f in open_elf(pie_demo).functions if f.name == "middle"]
    # 0x06 (push es) does not exist in 64-bit mode: the decoder stops there.
    broken = _patched_copy(pie_demo, tmp_path / "broken", middle.address, b"\x06")
    scan = scan_sites(broken, kinds={SiteKind.CALL})
    assert scan.undecodable == ("middle",)
    assert not any(s.function == "middle" for s in scan.sites)
    assert len(scan.sites) == len(find_sites(pie_demo, kinds={SiteKind.CALL})) - 2


def test_recorded_location_without_nop5_is_refused(fentry_demo: Path, tmp_path: Path) -> None:
    from textpoke.x86.insn import encode_call

    (leaf,) = [f for f in open_elf(fentry_demo).functions if f.name == "leaf"]
    call = encode_call(leaf.address, leaf.address + 0x10)
    changed = _patched_copy(fentry_demo, tmp_path / "changed", leaf.address, call)
    scan = scan_sites(changed, kinds={SiteKind.FENTRY})
    assert {s.function for s in scan.sites} == DEMO_FUNCTIONS - {"leaf"}
    assert scan.refused == ((leaf.address, f"recorded address holds {call.hex(' ')}, not nop5 or call __fentry__"),)
