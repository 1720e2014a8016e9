"""Sites of live processes: relocated by the load base, live bytes read back."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from textpoke import NoSuchProcess, SiteMismatch, UsageError
from textpoke.sites import (
    SiteKind,
    check_process_site,
    find_sites,
    scan_process,
    sites_in_process,
)
from textpoke.target.maps import read_maps
from textpoke.x86.insn import INT3, NOP5


@pytest.fixture(scope="module")
def pie_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=False, pie=True)


@pytest.fixture(scope="module")
def fentry_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=True)


def _expected(path: Path, base: int, **filters) -> list:
    """The file's sites moved by ``base``, as a process scan reports unchanged ones."""
    return [dataclasses.replace(s, file_insn=s.insn) for s in find_sites(path, base=base, **filters)]


def _write_mem(pid: int, address: int, data: bytes) -> None:
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    except PermissionError:
        pytest.skip("writing /proc/PID/mem needs ptrace rights over the target")
    try:
        assert os.pwrite(fd, data, address) == len(data)
    finally:
        os.close(fd)


def test_pie_process_sites_are_relocated(pie_demo: Path, start_waiting) -> None:
    live = start_waiting(pie_demo)
    scan = scan_process(live.pid)
    exe_maps = [m for m in read_maps(live.pid) if m.file_path == str(pie_demo)]
    base = min(m.start for m in exe_maps if m.offset == 0)
    # A PIE is linked at 0: the bias is where the kernel put it, never 0.
    assert scan.mapped.base == base != 0
    assert scan.mapped.path == str(pie_demo) and not scan.mapped.deleted
    assert list(scan.sites) == _expected(pie_demo, base)
    assert {s.function for s in scan.sites} >= {"main", "middle"} and scan.changed == ()
    # The relocated sites really are inside the executable mappings.
    for site in scan.sites:
        assert any(m.executable and m.start <= site.address < m.end for m in exe_maps)


def test_fentry_process_is_not_moved(fentry_demo: Path, start_waiting) -> None:
    live = start_waiting(fentry_demo)
    sites = sites_in_process(live.pid, kinds={SiteKind.FENTRY})
    assert [s.function for s in sites] == [s.function for s in find_sites(fentry_demo, kinds={SiteKind.FENTRY})]
    assert sites == _expected(fentry_demo, 0, kinds={SiteKind.FENTRY})
    assert all(s.insn == NOP5 and not s.changed for s in sites)


def test_changed_bytes_are_reported(pie_demo: Path, start_waiting) -> None:
    live = start_waiting(pie_demo)
    first = sites_in_process(live.pid, calls_to=["leaf"])[0]
    # middle already ran and never runs again while the target pauses: an int3
    # on its call, as a patcher would leave mid-batch, is harmless here.
    _write_mem(live.pid, first.address, INT3)
    scan = scan_process(live.pid)
    (changed,) = scan.changed
    assert changed.address == first.address
    assert changed.insn == INT3 + first.insn[1:]
    assert changed.file_insn == first.insn and changed.changed
    assert len([s for s in scan.sites if not s.changed]) == len(scan.sites) - 1
    with pytest.raises(SiteMismatch, match="holds cc"):
        check_process_site(live.pid, first.address, first.insn)
    ok = check_process_site(live.pid, first.address, INT3 + first.insn[1:])
    assert (ok.kind, ok.function, ok.file_insn) == (SiteKind.CALL, "middle", first.insn)


def test_library_by_name_and_path(pie_demo: Path, sites_lib: Path, start_waiting) -> None:
    live = start_waiting(pie_demo, env={"LD_PRELOAD": str(sites_lib)})
    by_name = scan_process(live.pid, path="libsites_lib")
    lib_head = [m for m in read_maps(live.pid) if m.file_path == str(sites_lib) and m.offset == 0]
    assert by_name.mapped.base == lib_head[0].start
    assert list(by_name.sites) == _expected(sites_lib, lib_head[0].start)
    fentry = [s for s in by_name.sites if s.kind is SiteKind.FENTRY]
    assert [s.function for s in fentry] == ["lib_leaf", "lib_twice"]
    assert all(s.insn == NOP5 for s in fentry)
    assert sites_in_process(live.pid, path=str(sites_lib)) == list(by_name.sites)
    libc = sites_in_process(live.pid, path="libc.so", kinds={SiteKind.CALL}, calls_to=["malloc"])
    # libc calls malloc both through its PLT (interposable) and directly.
    assert "malloc@plt" in {s.target_name for s in libc}
    assert {s.target_name for s in libc} <= {"malloc@plt", "malloc"}
    with pytest.raises(UsageError, match="matches several objects"):
        sites_in_process(live.pid, path="lib")
    with pytest.raises(UsageError, match="'libnothere' is not mapped"):
        sites_in_process(live.pid, path="libnothere")


def test_deleted_executable_is_read_through_map_files(pie_demo: Path, tmp_path: Path, start_waiting) -> None:
    copy = tmp_path / "gone"
    shutil.copyfile(pie_demo, copy)
    copy.chmod(0o755)
    live = start_waiting(copy)
    copy.unlink()
    if not os.access(f"/proc/{live.pid}/map_files", os.R_OK):
        pytest.skip("map_files is not readable here")
    scan = scan_process(live.pid, kinds={SiteKind.CALL}, functions=["middle"])
    assert scan.mapped.deleted and scan.mapped.elf_path.startswith(f"/proc/{live.pid}/map_files/")
    assert [s.target_name for s in scan.sites] == ["leaf", "leaf"]
    assert scan.changed == ()


def test_missing_process() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        beyond = int(f.read()) + 1
    with pytest.raises(NoSuchProcess, match=f"no process with pid {beyond}"):
        sites_in_process(beyond)
