"""symbol_ranges(pid): every function of the executable and its shared objects, in bulk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from textpoke.sites import mapped_object, symbol_ranges

from .conftest import nm_functions, stripped_copy


@pytest.fixture(scope="module")
def pie_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=False, pie=True)


def _name_at(ranges, address: int) -> str | None:
    (index,) = ranges.lookup(np.array([address], dtype=np.uint64)).tolist()
    return None if index < 0 else str(ranges.names[index])


def test_ranges_cover_executable_library_libc_and_plt(pie_demo: Path, sites_lib: Path, start_waiting) -> None:
    live = start_waiting(pie_demo, env={"LD_PRELOAD": str(sites_lib)})
    ranges = symbol_ranges(live.pid)
    assert ranges.starts.dtype == np.uint64 and ranges.ends.dtype == np.uint64 and ranges.names.dtype == object
    assert (np.diff(ranges.starts.astype(np.int64)) >= 0).all() and (ranges.ends > ranges.starts).all()
    exe, exe_image = mapped_object(live.pid)
    # Oracle: nm's symbols of the executable and of the library, moved by their load bias.
    for address, names in nm_functions(pie_demo).items():
        assert _name_at(ranges, exe.base + address) in names
        assert _name_at(ranges, exe.base + address + 1) in names  # inside the function too
    lib, _ = mapped_object(live.pid, path="libsites_lib")
    for address, names in nm_functions(sites_lib).items():
        assert _name_at(ranges, lib.base + address) in names
    libc, libc_image = mapped_object(live.pid, path="libc.so")
    malloc = next(f for f in libc_image.functions if "malloc" in f.names)
    assert _name_at(ranges, libc.base + malloc.address) == malloc.name
    printf_plt = next(stub for stub, name in exe_image.plt.items() if name == "printf@plt")
    assert _name_at(ranges, exe.base + printf_plt) == "printf@plt"
    # Every executable file mapping contributes: ld.so's exported functions too.
    loader, loader_image = mapped_object(live.pid, path="ld-linux")
    dl = next(f for f in loader_image.functions if f.name == "_dl_catch_exception" or "_dl_catch_exception" in f.names)
    assert _name_at(ranges, loader.base + dl.address) == dl.name


def test_stripped_executable_functions_are_sub_names_at_runtime(pie_demo: Path, tmp_path: Path,
                                                                 start_waiting) -> None:
    stripped = stripped_copy(pie_demo, tmp_path / "demo")
    live = start_waiting(stripped)
    ranges = symbol_ranges(live.pid)
    exe, _ = mapped_object(live.pid)
    for address in nm_functions(pie_demo):
        assert _name_at(ranges, exe.base + address) == f"sub_{address:x}"


def test_python3_process(start_waiting) -> None:
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("/usr/bin/python3 is not installed")
    proc = subprocess.Popen([str(python), "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        ranges = symbol_ranges(proc.pid)
        exe, image = mapped_object(proc.pid)
        # Its exported functions (.dynsym) by name, its others as sub_<address> (from .eh_frame).
        exported = next(f for f in image.functions if f.name == "PyObject_GetAttr")
        assert _name_at(ranges, exe.base + exported.address) == "PyObject_GetAttr"
        assert len(ranges.names) > len(image.table)
        libc, libc_image = mapped_object(proc.pid, path="libc.so")
        write = next(f for f in libc_image.functions if "write" in f.names)
        assert _name_at(ranges, libc.base + write.address) == write.name
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
