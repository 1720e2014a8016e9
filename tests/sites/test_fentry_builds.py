"""fentry builds as users have them: `call __fentry__` sites, PIE builds, patchable entries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from textpoke import SiteError
from textpoke.sites import SiteKind, check_site, find_sites, open_elf, scan_sites, sites_in_process
from textpoke.sites.discover import (
    REASON_FENTRY_CALL,
    REASON_FENTRY_CALL_ENTRY,
    REFUSED_GOT_CALL,
    REFUSED_ONE_BYTE_NOPS,
)
from textpoke.sites.explain import nothing_found
from textpoke.x86.insn import CALL_OPCODE, CALL_SIZE, NOP5

from .conftest import TARGETS, Commanded, build, objdump

#: What every function of exact_calls.c is (main, f, g, the callers...): each gets one entry site.
PG = ("-pg", "-mfentry")


@pytest.fixture(scope="module")
def fentry_call_build() -> Path:
    """Non-PIE, -pg -mfentry -mrecord-mcount without -mnop-mcount: `call __fentry__@plt` at each entry."""
    return build(TARGETS / "exact_calls.c", cflags=("-O2", "-pthread", "-fno-pie", *PG, "-mrecord-mcount"),
                 ldflags=("-pthread", "-no-pie"), name="exact_calls_fentry_call")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "textpoke", "sites", *args], capture_output=True, text=True,
                          timeout=120)


def _entry_calls(binary: Path) -> dict[int, str]:
    """Oracle: objdump's `call <__fentry__@plt>` instructions, by address."""
    return {i.address: i.target_name for i in objdump(binary) if i.target_name == "__fentry__@plt"
            and len(i.raw) == CALL_SIZE and i.raw[0] == CALL_OPCODE}


def test_call_fentry_sites_are_fentry_sites(fentry_call_build: Path) -> None:
    image = open_elf(fentry_call_build)
    sites = find_sites(fentry_call_build, kinds={SiteKind.FENTRY})
    assert {s.address for s in sites} == set(_entry_calls(fentry_call_build)) == set(image.mcount_locs)
    for site in sites:
        assert site.kind is SiteKind.FENTRY and site.reason == REASON_FENTRY_CALL
        assert site.insn[0] == CALL_OPCODE and site.target_name == "__fentry__@plt"
        assert site.offset_in_function == 0
    (f,) = find_sites(fentry_call_build, kinds={SiteKind.FENTRY}, functions=["f"])
    assert f.function == "f" and check_site(fentry_call_build, f.address, f.insn) == f
    # Listed once, as the fentry site, when call sites are asked for too.
    both = find_sites(fentry_call_build, kinds={SiteKind.CALL, SiteKind.FENTRY}, functions=["f"])
    assert [s.kind for s in both if s.address == f.address] == [SiteKind.FENTRY]


def test_call_fentry_without_mcount_record(tmp_path: Path) -> None:
    binary = build(TARGETS / "sites_demo.c", cflags=("-O2", "-fno-pie", *PG), ldflags=("-no-pie",),
                   name="sites_demo_fentry_norecord")
    image = open_elf(binary)
    assert not image.has_mcount_section
    sites = find_sites(binary, kinds={SiteKind.FENTRY})
    assert {s.function for s in sites} == {"leaf", "middle", "via_pointer", "probe", "main"}
    assert {s.reason for s in sites} == {REASON_FENTRY_CALL_ENTRY}
    assert {s.address for s in sites} == set(_entry_calls(binary))


def test_tracer_replaces_call_fentry_and_puts_it_back(fentry_call_build: Path) -> None:
    """The entry stub takes a `call __fentry__` site exactly like a nop5: exact counts,
    and reverting writes the original call back."""
    from textpoke.poke import attach
    from textpoke.trampolines.tracer import Mode, StubKind, TracedSite, Tracer, probe_thread_abi

    target = Commanded([str(fentry_call_build)])
    try:
        (site,) = sites_in_process(target.pid, kinds={SiteKind.FENTRY}, functions=("f",))
        assert site.insn == site.file_insn and site.insn[0] == CALL_OPCODE
        with attach(target.pid) as session:
            abi = probe_thread_abi(session.process, exclude=frozenset({session.resident.agent_tid}))
            tracer = Tracer(session.resident, [TracedSite(site.address, StubKind.ENTRY, site.insn)],
                            mode=Mode.COUNT, abi=abi)
            try:
                session.apply(tracer.patches)
                patched = session.process.read(site.address, CALL_SIZE)
                assert patched[0] == CALL_OPCODE and patched != site.insn
                (now,) = sites_in_process(target.pid, kinds={SiteKind.FENTRY}, functions=("f",))
                assert now.changed and now.current_target_name and "textpoke" in now.current_target_name
                target.ask("calls 1000")
                assert tracer.counts().tolist() == [4 * 1000]
                session.revert()
                assert session.process.read(site.address, CALL_SIZE) == site.insn
            finally:
                tracer.close()
        assert target.ask("calls 10")["tids"]  # still healthy, __fentry__ called again
    finally:
        target.close()


def test_pie_fentry_build_is_refused_with_its_reason() -> None:
    """Debian's default-PIE gcc: -pg -mfentry gives `call *__fentry__@GOTPCREL(%rip)`, 6 bytes."""
    binary = build(TARGETS / "sites_demo.c", cflags=("-O2", *PG, "-mrecord-mcount"), name="sites_demo_pie_fentry")
    image = open_elf(binary)
    assert image.is_pie
    scan = scan_sites(binary, kinds={SiteKind.FENTRY})
    assert not scan.sites
    assert {why for _, why in scan.refused} == {REFUSED_GOT_CALL}
    assert {a for a, _ in scan.refused} == set(image.mcount_locs)
    error = nothing_found(scan, sites_command=f"textpoke sites {binary}", library_option=False)
    assert isinstance(error, SiteError) and "6-byte" in error.message and "-fno-pie -no-pie" in error.message
    done = _run(str(binary), "--kind", "fentry")
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["0 sites: 0 fentry, 0 call in 0 functions (5 recorded fentry locations refused)"]
    assert f"textpoke: note: none of the 5 recorded fentry locations of {binary} is a site: {REFUSED_GOT_CALL}" \
        in done.stderr.splitlines()
    # Its call sites still work, and the listing says why the entries are not there.
    both = _run(str(binary))
    assert both.returncode == 0 and " call " in both.stdout
    assert f"textpoke: note: 5 recorded fentry locations refused: {REFUSED_GOT_CALL}" in both.stderr.splitlines()


def test_recording_a_pie_fentry_build_is_refused_before_it_runs(tmp_path: Path) -> None:
    """`record -f` on such a build: exit 5, the reason, and the program never ran (the README says so)."""
    binary = build(TARGETS / "sites_demo.c", cflags=("-O2", *PG, "-mrecord-mcount"), name="sites_demo_pie_fentry")
    done = subprocess.run([sys.executable, "-m", "textpoke", "record", "-f", "*", "-o", str(tmp_path / "r.tpk"), "--",
                           str(binary)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stderr
    assert REFUSED_GOT_CALL in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""  # the program prints its value when it runs: it never did
    assert not (tmp_path / "r.tpk").exists()


def test_patchable_function_entry_one_byte_nops_are_refused() -> None:
    binary = build(TARGETS / "sites_demo.c", cflags=("-O2", "-fno-pie", "-fpatchable-function-entry=5"),
                   ldflags=("-no-pie",), name="sites_demo_patchable")
    image = open_elf(binary)
    assert len(image.patchable_entries) == 5
    scan = scan_sites(binary, kinds={SiteKind.FENTRY})
    assert not scan.sites
    assert scan.refused and {why for _, why in scan.refused} == {REFUSED_ONE_BYTE_NOPS}
    entry = image.patchable_entries[0]
    assert image.read(entry, CALL_SIZE) == b"\x90" * CALL_SIZE
    with pytest.raises(SiteError):
        check_site(binary, entry, None)


def test_nop5_recipe_still_gives_nop5(build_target) -> None:
    binary = build_target("sites_demo", fentry=True)
    assert {s.insn for s in find_sites(binary, kinds={SiteKind.FENTRY})} == {NOP5}
