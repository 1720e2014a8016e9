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
