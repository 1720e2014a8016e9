"""`textpoke sites PID`: a site changed in memory shows what runs now and its original."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from textpoke.sites import SiteKind, find_sites, mapped_object, sites_in_process
from textpoke.x86.insn import INT3, NOP5, encode_call


@pytest.fixture(scope="module")
def pie_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=False, pie=True)


@pytest.fixture(scope="module")
def fentry_demo(build_target) -> Path:
    return build_target("sites_demo", fentry=True)


def _textpoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "textpoke", *args], capture_output=True, text=True, timeout=120)


def _json(pid: int, *args: str) -> list[dict]:
    done = _textpoke("sites", str(pid), "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _write(pid: int, address: int, data: bytes) -> None:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        os.pwrite(fd, data, address)
    finally:
        os.close(fd)


def test_a_retargeted_call_shows_the_new_callee_and_the_ledger_original(pie_demo: Path, start_waiting) -> None:
    live = start_waiting(pie_demo)
    done = _textpoke("patch", "-p", str(live.pid), "--retarget", "middle:leaf:probe")
    assert done.returncode == 0, done.stderr
    first, second = _json(live.pid, "-f", "middle", "--kind", "call")
    for entry in (first, second):
        assert entry["changed"] is True and entry["target_name"] == "leaf"  # the file's callee
        assert entry["now"]["insn"] == "call probe" and entry["now"]["target_name"] == "probe"
        assert entry["now"]["bytes"] == entry["bytes"] != entry["file_bytes"]
        assert entry["original"] == {"insn": "call leaf", "bytes": entry["file_bytes"], "source": "ledger"}
    table = _textpoke("sites", str(live.pid), "-f", "middle", "--kind", "call").stdout.splitlines()
    row = next(line for line in table if line.startswith(first["address_hex"]))
    original = bytes.fromhex(first["file_bytes"]).hex(" ")
    assert row.endswith(f"now: call probe; original: call leaf ({original}, from textpoke's ledger)")
    assert table[-1] == "2 sites: 0 fentry, 2 call in 1 function (2 changed in memory)"
    # The Site objects carry it too.
    now = sites_in_process(live.pid, kinds={SiteKind.CALL}, functions=["middle"])
    assert [(s.current_target_name, s.target_name) for s in now] == [("probe", "leaf")] * 2
    assert _textpoke("recover", "-p", str(live.pid)).returncode == 0
    assert [e["changed"] for e in _json(live.pid, "-f", "middle", "--kind", "call")] == [False, False]


def test_a_change_textpoke_did_not_make_shows_the_file_original(pie_demo: Path, start_waiting) -> None:
    live = start_waiting(pie_demo)
    (site, other) = sites_in_process(live.pid, kinds={SiteKind.CALL}, functions=["middle"])
    obj, image = mapped_object(live.pid)
    probe_start = obj.base + next(f.address for f in image.functions if f.name == "probe")
    _write(live.pid, site.address, encode_call(site.address, probe_start))
    _write(live.pid, other.address, INT3)
    first, second = _json(live.pid, "-f", "middle", "--kind", "call")
    assert first["now"]["insn"] == "call probe"
    assert first["original"] == {"insn": "call leaf", "bytes": site.insn.hex(), "source": "file"}
    assert second["now"]["insn"].startswith("int3 not placed by textpoke")
    assert second["original"]["source"] == "file"


def test_a_site_under_a_trace_shows_the_trampoline(fentry_demo: Path, start_waiting) -> None:
    from textpoke.poke import attach
    from textpoke.trampolines.tracer import Mode, StubKind, TracedSite, Tracer, probe_thread_abi

    live = start_waiting(fentry_demo)
    (site,) = sites_in_process(live.pid, kinds={SiteKind.FENTRY}, functions=["leaf"])
    with attach(live.pid) as session:
        abi = probe_thread_abi(session.process, exclude=frozenset({session.resident.agent_tid}))
        tracer = Tracer(session.resident, [TracedSite(site.address, StubKind.ENTRY, site.insn)],
                        mode=Mode.COUNT, abi=abi)
        try:
            session.apply(tracer.patches)
            (entry,) = _json(live.pid, "-f", "leaf", "--kind", "fentry")
            session.revert()
        finally:
            tracer.close()
    assert entry["changed"] is True and entry["file_bytes"] == NOP5.hex()
    assert entry["now"]["insn"].startswith("call textpoke trampoline (memfd:textpoke-")
    assert entry["original"] == {"insn": "nop5", "bytes": NOP5.hex(), "source": "ledger"}
    assert find_sites(fentry_demo, kinds={SiteKind.FENTRY}, functions=["leaf"])[0].insn == NOP5
