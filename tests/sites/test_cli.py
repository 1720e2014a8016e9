"""``textpoke sites``: table, summary, JSON, filters, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from textpoke.cli import cli
from textpoke.sites import SiteKind, find_sites


@pytest.fixture(scope="module")
def fentry_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=True)


@pytest.fixture(scope="module")
def pie_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=False, pie=True)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "textpoke", "sites", *args], capture_output=True, text=True, timeout=60
    )


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, ["sites", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_table_and_summary_of_a_fentry_target(fentry_demo: Path) -> None:
    out = _invoke(str(fentry_demo)).splitlines()
    sites = find_sites(fentry_demo)
    calls = sum(1 for s in sites if s.kind is SiteKind.CALL)
    functions = len({s.function for s in sites})
    assert out[0].split() == ["address", "kind", "function", "bytes", "target"]
    assert len(out) == 1 + len(sites) + 1
    assert out[-1] == f"{len(sites)} sites: 5 fentry, {calls} call in {functions} functions"
    leaf = next(s for s in sites if s.function == "leaf")
    row = next(line for line in out if line.startswith(f"{leaf.address:#x} "))
    assert row.split() == [f"{leaf.address:#x}", "fentry", "leaf+0x0", "0f", "1f", "44", "00", "00"]


def test_filters_and_limit(pie_demo: Path) -> None:
    out = _invoke(str(pie_demo), "-f", "middle").splitlines()
    assert out[-1] == "2 sites: 0 fentry, 2 call in 1 function"
    assert [line.split()[-1] for line in out[1:-1]] == ["leaf", "leaf"]
    limited = _invoke(str(pie_demo), "--kind", "call", "--limit", "1").splitlines()
    total = len(find_sites(pie_demo, kinds={SiteKind.CALL}))
    assert len(limited) == 3 and limited[-1].endswith("(1 shown)")
    assert limited[-1].startswith(f"{total} sites: 0 fentry, {total} call")
    to_printf = _invoke(str(pie_demo), "--calls-to", "printf").splitlines()
    assert to_printf[-1] == "2 sites: 0 fentry, 2 call in 1 function"
    jmp = _invoke(str(pie_demo), "--kind", "jmp", "--kind", "call", "-f", "middle")
    assert jmp.splitlines()[-1] == "2 sites: 0 fentry, 2 call in 1 function"


def test_json(pie_demo: Path) -> None:
    entries = json.loads(_invoke(str(pie_demo), "--json", "--kind", "call"))
    sites = find_sites(pie_demo, kinds={SiteKind.CALL})
    assert [e["address"] for e in entries] == [s.address for s in sites]
    first = entries[0]
    assert set(first) == {
        "address", "address_hex", "kind", "bytes", "function", "offset", "target", "target_name", "reason",
    }
    assert (first["kind"], first["bytes"], first["target"]) == ("call", sites[0].insn.hex(), sites[0].target)
    assert len(json.loads(_invoke(str(pie_demo), "--json", "--limit", "3"))) == 3


def test_pid_argument(pie_demo: Path, start_waiting) -> None:
    live = start_waiting(pie_demo)
    entries = json.loads(_invoke(str(live.pid), "--json", "-f", "middle"))
    assert [e["target_name"] for e in entries] == ["leaf", "leaf"]
    assert all(e["changed"] is False and e["file_bytes"] == e["bytes"] for e in entries)
    # Relocated: a PIE never runs at its link address.
    file_sites = find_sites(pie_demo, functions=["middle"])
    assert entries[0]["address"] != file_sites[0].address
    assert entries[0]["address"] - file_sites[0].address == entries[1]["address"] - file_sites[1].address


def test_python3_call_sites_via_cli() -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("/usr/bin/python3 is not installed")
    out = _invoke("/usr/bin/python3", "--kind", "call", "--limit", "5").splitlines()
    # python3 is stripped: one note says so (its functions come from .dynsym and .eh_frame).
    notes = [line for line in out if line.startswith("textpoke: note: ")]
    assert len(notes) == 1 and "is stripped" in notes[0]
    out = [line for line in out if line not in notes]
    assert len(out) == 7 and all(line.split()[1] == "call" for line in out[1:6])
    total = int(out[-1].split()[0])
    assert total >= 2000 and out[-1].endswith("(5 shown)")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("/nonexistent/binary",), 6, "textpoke: error: no such file: /nonexistent/binary"),
        ((__file__,), 6, f"textpoke: error: {__file__} is not an ELF file"),
        (("/usr/bin/python3", "--lib", "libc.so"), 2, "textpoke: error: --lib selects a library mapped in a process; it needs a pid"),
    ],
)
def test_errors_are_one_line_with_a_hint(args: tuple[str, ...], code: int, message: str) -> None:
    done = _run(*args)
    assert done.returncode == code
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0] == message and lines[1].startswith("textpoke: hint: ")


def test_unknown_pid_is_one_line() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        beyond = int(f.read()) + 1
    done = _run(str(beyond))
    assert done.returncode == 3
    assert done.stderr.splitlines()[0] == f"textpoke: error: no process with pid {beyond}"
    assert len(done.stderr.splitlines()) == 2 and "Traceback" not in done.stderr


def test_bad_kind_is_a_usage_error(pie_demo: Path) -> None:
    done = _run(str(pie_demo), "--kind", "ret")
    assert done.returncode == 2 and "Invalid value for '--kind'" in done.stderr
