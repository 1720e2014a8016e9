"""Sites holding someone else's int3 (a debugger's breakpoint, a uprobe's).

tests/targets/foreign.c writes 0xcc over one of its own call sites itself, as
gdb does for a breakpoint. A batch naming that site is refused with the count
and the address of every such site (ForeignTrap), never blamed on another
textpoke session; with ``skip_foreign`` the batch goes on without it and says
which it left out. Their bytes are never touched.
"""

from __future__ import annotations

import pytest

from textpoke import ForeignTrap, SiteMismatch
from textpoke.poke import Patch, attach
from textpoke.sites import SiteKind, find_sites
from textpoke.x86.insn import INT3_BYTE, encode_call

from .harness import Target, fields, read_mem, symbols


def _calls(binary, function: str) -> int:
    (site,) = [s.address for s in find_sites(binary, kinds={SiteKind.CALL}, functions=[function], calls_to=["A"])]
    return site


def test_foreign_int3_refused_by_count_and_address_or_skipped(build_target):
    binary = build_target("foreign")
    syms = symbols(binary)
    hot, cold = _calls(binary, "site_caller"), _calls(binary, "cold_caller")
    target = Target([str(binary), f"{cold:x}"])
    try:
        cold_bytes = read_mem(target.pid, cold, 5)
        assert cold_bytes[0] == INT3_BYTE
        batch = [Patch(site=s, old=encode_call(s, syms["A"]), new=encode_call(s, syms["B"])) for s in (hot, cold)]
        with attach(target.pid) as session:
            with pytest.raises(ForeignTrap) as info:
                session.apply(batch)
            error = info.value
            assert error.sites == (cold,) and error.exit_code == 11 and isinstance(error, SiteMismatch)
            assert error.message == (f"1 of 2 sites hold an int3 that is not textpoke's (a debugger's breakpoint "
                                     f"or a uprobe): {cold:#x}; nothing was written")
            assert "session" not in error.message + (error.hint or "")
            assert read_mem(target.pid, hot, 5) == batch[0].old  # nothing written
            result = session.apply(batch, skip_foreign=True)
            assert (result.patched, result.foreign, session.foreign_sites) == ((hot,), (cold,), {cold})
            assert read_mem(target.pid, hot, 5) == batch[0].new
            assert cold not in session.resident.ledger  # not ours to put back
            while fields(target.ask("count"))["b"] == 0:  # the workers now call B through the hot site
                pass
        assert read_mem(target.pid, hot, 5) == batch[0].old  # reverted at close, the other left alone
        assert read_mem(target.pid, cold, 5) == cold_bytes
        result = fields(target.ask("stop"))
    finally:
        target.kill()
    assert result["bad"] == 0 and result["a"] + result["b"] == result["made"] and result["b"] > 0


def test_trace_leaves_foreign_int3_out_and_says_so(build_target, tmp_path):
    """`textpoke trace --calls-to A`: the call site holding someone else's int3 is not
    traced, and said so by address and function, in the output and in the report."""
    import subprocess
    import sys

    binary = build_target("foreign")
    hot, cold = _calls(binary, "site_caller"), _calls(binary, "cold_caller")
    target = Target([str(binary), f"{cold:x}"])
    try:
        out = tmp_path / "t.tpk"
        result = subprocess.run([sys.executable, "-m", "textpoke", "trace", "-p", str(target.pid), "--calls-to", "A",
                                 "--duration", "0.3", "-o", str(out)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        lines = result.stderr.splitlines()
        assert lines[0].endswith(f", 1 site -> {out}")
        assert lines[1] == (f"textpoke: note: 1 of 2 sites hold someone else's int3 (a debugger's breakpoint or a "
                            f"uprobe) and were not traced: {cold:#x} (cold_caller)")
        assert "session" not in result.stderr
        report = subprocess.run([sys.executable, "-m", "textpoke", "report", str(out)], capture_output=True,
                                text=True, timeout=120)
        assert "1 of 2 sites hold someone else's int3" in report.stdout and f"{cold:#x}" in report.stdout
        from textpoke.ring import Recording

        with Recording.load(out) as recording:
            assert recording.metadata["foreign_sites"] == [cold]
            assert recording.record_count > 0 and set(recording.records["caller"].tolist()) == {hot}
        assert read_mem(target.pid, cold, 1)[0] == INT3_BYTE  # never touched
        result = fields(target.ask("stop"))
    finally:
        target.kill()
    assert result["bad"] == 0
