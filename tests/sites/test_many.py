"""A program with thousands of functions: exact results, and work proportional to the selection.

(Times are measured by bench/sites.py, never asserted here.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from textpoke.sites import SiteKind, find_sites, scan_sites, sites_in_process
from textpoke.sites import process as process_module
from textpoke.x86.insn import CALL_OPCODE, CALL_SIZE, NOP5

from .conftest import many_functions, objdump

N = 2000
FENTRY = ("-O1", "-fno-pie", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount")


@pytest.fixture(scope="module")
def many() -> Path:
    return many_functions(N, cflags=FENTRY, ldflags=("-no-pie",))


def test_every_function_has_its_fentry_site(many: Path) -> None:
    scan = scan_sites(many, kinds={SiteKind.FENTRY})
    assert len(scan.columns) == N + 1 and not scan.refused
    assert (scan.columns.insn == np.frombuffer(NOP5, np.uint8)).all()
    assert {s.function for s in scan.sites} == {f"f{i}" for i in range(N)} | {"main"}


def test_calls_to_malloc_match_objdump(many: Path) -> None:
    sites = find_sites(many, kinds={SiteKind.CALL}, calls_to=["malloc"])
    oracle = {i.address for i in objdump(many) if i.target_name == "malloc@plt"
              and len(i.raw) == CALL_SIZE and i.raw[0] == CALL_OPCODE}
    assert {s.address for s in sites} == oracle and len(oracle) == N // 10


def test_cli_lists_every_fentry_site(many: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "textpoke", "sites", str(many), "--kind", "fentry"],
                          capture_output=True, text=True, timeout=120, check=True)
    lines = done.stdout.splitlines()
    assert len(lines) == N + 3
    assert lines[-1] == f"{N + 1} sites: {N + 1} fentry, 0 call in {N + 1} functions"


def test_one_function_of_a_process_reads_and_builds_only_its_sites(many: Path, start_waiting, monkeypatch) -> None:
    live = start_waiting(many)
    read: list[int] = []
    real_read = process_module.read_live_array

    def counting(pid: int, addresses, size: int = CALL_SIZE):
        read.append(len(addresses))
        return real_read(pid, addresses, size)

    monkeypatch.setattr(process_module, "read_live_array", counting)
    sites = sites_in_process(live.pid, functions=("f1",))
    assert [(s.kind, s.function, s.target_name) for s in sites] == [
        (SiteKind.FENTRY, "f1", None), (SiteKind.CALL, "f1", "f0")]
    assert read == [2]  # the live bytes of those two sites, nothing else
