"""Stripped binaries: functions from .eh_frame, names from .dynsym, the PLT and debug files.

Oracles: the unstripped build of the same program (nm for function bounds,
objdump -d for call sites), and objdump -d of Debian's own stripped binaries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from textpoke.sites import SiteKind, find_sites, open_elf, scan_sites
from textpoke.sites.elf import Origin, clear_cache
from textpoke.x86.insn import CALL_OPCODE, CALL_SIZE

from .conftest import debian_binary, many_functions, nm_functions, objdump, stripped_copy


@pytest.fixture(scope="module")
def programs(build_target) -> list[Path]:
    """Unstripped PIE builds: a small one, one with threads, one with 300 functions."""
    return [
        build_target("sites_demo", fentry=False, pie=True),
        build_target("cli_calls", fentry=False, pie=True),
        many_functions(300, cflags=("-O2", "-g"), tag="-pie"),
    ]


def _stripped(binary: Path, tmp_path: Path) -> Path:
    clear_cache()
    return stripped_copy(binary, tmp_path / f"{binary.name}.stripped")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "textpoke", "sites", *args], capture_output=True, text=True,
                          timeout=120)


def test_function_bounds_of_a_stripped_copy_are_the_symbols_of_the_unstripped(programs, tmp_path) -> None:
    for binary in programs:
        stripped = _stripped(binary, tmp_path)
        image = open_elf(stripped)
        assert image.stripped and not image.local_names
        oracle = nm_functions(binary)
        symbols = open_elf(binary)
        bounds = {(f.address, f.end) for f in symbols.functions if f.address in oracle}
        assert {(f.address, f.end) for f in image.functions} == bounds, binary.name
        # Without exported functions every name is the link address.
        assert {f.name for f in image.functions} == {f"sub_{a:x}" for a, _ in bounds}
        assert (image.table.origin == Origin.EH_FRAME).all()


def test_call_sites_of_a_stripped_copy_match_objdump_of_the_unstripped(programs, tmp_path) -> None:
    for binary in programs:
        stripped = _stripped(binary, tmp_path)
        unstripped = open_elf(binary)
        oracle = {
            (i.address, i.target_name)
            for i in objdump(binary)
            if len(i.raw) == CALL_SIZE and i.raw[0] == CALL_OPCODE and unstripped.function_at(i.address)
        }
        ours = find_sites(stripped, kinds={SiteKind.CALL})
        assert {s.address for s in ours} == {a for a, _ in oracle}, binary.name
        names = dict(oracle)
        for site in ours:
            expected = names[site.address]
            assert site.target is not None
            if expected.endswith("@plt"):
                assert site.target_name == expected
            else:
                # A local callee: unnamed in the stripped copy, at the unstripped symbol's address.
                assert site.target_name == f"sub_{site.target:x}"
                assert unstripped.function_starting_at(site.target).name == expected  # type: ignore[union-attr]
        # The same site, seen through the unstripped build, is in the function of that name.
        for site in ours:
            assert unstripped.function_at(site.address).address == site.address - site.offset_in_function  # type: ignore[union-attr]


def test_calls_to_a_plt_function_in_a_stripped_copy(programs, tmp_path) -> None:
    binary = programs[2]  # many_functions: f0, f10, f20... call malloc once each
    stripped = _stripped(binary, tmp_path)
    sites = find_sites(stripped, kinds={SiteKind.CALL}, calls_to=["malloc"])
    assert len(sites) == 30 and {s.target_name for s in sites} == {"malloc@plt"}
    assert sites == find_sites(stripped, kinds={SiteKind.CALL}, calls_to=["malloc@plt"])
    unstripped = {s.address for s in find_sites(binary, kinds={SiteKind.CALL}, calls_to=["malloc"])}
    assert {s.address for s in sites} == unstripped


def test_sub_names_select_functions(programs, tmp_path) -> None:
    binary = programs[0]
    stripped = _stripped(binary, tmp_path)
    middle = open_elf(binary).function_starting_at(
        next(f.address for f in open_elf(binary).functions if f.name == "middle"))
    assert middle is not None
    sites = find_sites(stripped, kinds={SiteKind.CALL}, functions=[f"sub_{middle.address:x}"])
    assert [s.offset_in_function for s in sites] == [
        s.offset_in_function for s in find_sites(binary, kinds={SiteKind.CALL}, functions=["middle"])
    ]


def test_debug_file_found_by_build_id_names_the_functions(programs, tmp_path, monkeypatch) -> None:
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy (binutils) is needed")
    binary = programs[0]
    stripped = _stripped(binary, tmp_path)
    build_id = open_elf(binary).build_id
    assert build_id is not None
    debug = tmp_path / "debug" / ".build-id" / build_id.hex()[:2] / f"{build_id.hex()[2:]}.debug"
    debug.parent.mkdir(parents=True)
    subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
    monkeypatch.setenv("TEXTPOKE_DEBUG_DIRS", str(tmp_path / "nowhere") + ":" + str(tmp_path / "debug"))
    clear_cache()
    image = open_elf(stripped)
    assert image.stripped and image.local_names and image.debug_file == str(debug)
    assert {(f.name, f.address, f.size) for f in image.functions} == {
        (f.name, f.address, f.size) for f in open_elf(binary).functions
    }
    assert ".symtab of" in image.symbol_source
    assert [s.function for s in find_sites(stripped, kinds={SiteKind.CALL}, functions=["middle"])] == [
        "middle", "middle"]


def test_a_debug_file_of_another_build_is_not_used(programs, tmp_path, monkeypatch) -> None:
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy (binutils) is needed")
    binary, other = programs[0], programs[1]
    stripped = _stripped(binary, tmp_path)
    build_id = open_elf(binary).build_id
    assert build_id is not None
    wrong = tmp_path / "debug" / ".build-id" / build_id.hex()[:2] / f"{build_id.hex()[2:]}.debug"
    wrong.parent.mkdir(parents=True)
    subprocess.run(["objcopy", "--only-keep-debug", str(other), str(wrong)], check=True)
    monkeypatch.setenv("TEXTPOKE_DEBUG_DIRS", str(tmp_path / "debug"))
    clear_cache()
    image = open_elf(stripped)
    assert image.debug_file is None and not image.local_names


def test_debug_file_found_by_debuglink(programs, tmp_path, monkeypatch) -> None:
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy (binutils) is needed")
    binary = programs[1]
    debug = tmp_path / "prog.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
    stripped = tmp_path / "prog"
    subprocess.run(["objcopy", "--strip-all", "--remove-section=.note.gnu.build-id",
                    f"--add-gnu-debuglink={debug}", str(binary), str(stripped)], check=True, cwd=tmp_path)
    monkeypatch.setenv("TEXTPOKE_DEBUG_DIRS", str(tmp_path / "nowhere"))
    clear_cache()
    image = open_elf(stripped)
    assert image.build_id is None and image.debug_file == str(debug)
    assert "work_alpha" in {f.name for f in image.functions}
    # A debug file whose CRC does not match (rebuilt since) is not used.
    debug.write_bytes(debug.read_bytes() + b"\0")
    clear_cache()
    assert open_elf(stripped).debug_file is None


def test_cli_on_a_stripped_binary_says_so_and_what_works(programs, tmp_path) -> None:
    stripped = _stripped(programs[0], tmp_path)
    done = _run(str(stripped), "-f", "middle")
    assert done.returncode == 12 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"textpoke: error: no function of {stripped} matches 'middle' ({stripped} is stripped")
    assert lines[1].startswith("textpoke: hint: what works on it:") and "--calls-to" in lines[1]
    assert len(lines) == 2
    listed = _run(str(stripped), "--kind", "call")
    assert listed.returncode == 0
    calls = len(find_sites(programs[0], kinds={SiteKind.CALL}))
    assert listed.stdout.splitlines()[-1] == f"{calls} sites: 0 fentry, {calls} call in 2 functions"
    note = listed.stderr.splitlines()[0]
    assert note.startswith(f"textpoke: note: {stripped} is stripped: its 6 functions are 0 exported (.dynsym), "
                           "6 unnamed from .eh_frame, shown as sub_<address>")
    assert "glob" not in listed.stderr


def _objdump_calls(binary: Path, callee: str) -> set[int]:
    """Oracle: every 5-byte `call <callee>` objdump -d decodes in the file."""
    return {
        i.address
        for i in objdump(binary)
        if len(i.raw) == CALL_SIZE and i.raw[0] == CALL_OPCODE and i.target_name == callee
    }


@pytest.mark.parametrize(
    ("path", "package"),
    [
        ("/usr/bin/jq", "jq"),
        ("/usr/lib/x86_64-linux-gnu/libjq.so.1", "libjq1"),
        ("/usr/bin/sqlite3", "sqlite3"),
        ("/usr/bin/gzip", "gzip"),
    ],
)
def test_calls_to_malloc_in_debian_stripped_binaries_match_objdump(path: str, package: str) -> None:
    binary = debian_binary(path, package)
    image = open_elf(binary)
    if not image.stripped:
        pytest.skip(f"{path} is not stripped here")
    scan = scan_sites(binary, kinds={SiteKind.CALL}, calls_to=["malloc"])
    oracle = _objdump_calls(binary, "malloc@plt")
    assert {s.address for s in scan.sites} == oracle
    assert {s.target_name for s in scan.sites} <= {"malloc@plt"}
    assert not scan.undecodable
    # Each site is a call the decoder reached from a function start (check_site decodes again).
    from textpoke.sites import check_site

    for site in scan.sites:
        assert check_site(binary, site.address, site.insn) == site


def test_jq_calls_to_malloc_point_to_its_library() -> None:
    binary = debian_binary("/usr/bin/jq", "jq")
    done = _run(str(binary), "--kind", "call", "--calls-to", "malloc")
    assert done.returncode == 0
    assert done.stdout.splitlines()[-1] == f"{len(_objdump_calls(binary, 'malloc@plt'))} sites: 0 fentry, 0 call in 0 functions"
    hint = done.stderr.splitlines()[-1]
    assert hint.startswith("textpoke: hint: libjq.so.1 calls it: `textpoke sites ")
    command = hint.split("`")[1].split()
    # The suggested command works and finds the calls objdump sees.
    rerun = _run(*command[2:], "--json")
    assert rerun.returncode == 0
    library = Path(command[2])
    assert {e["address"] for e in json.loads(rerun.stdout)} == _objdump_calls(library, "malloc@plt")
