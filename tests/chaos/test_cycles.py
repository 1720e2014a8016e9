"""Attach -> patch 100 sites -> detach, over and over, against 4 threads in a hot loop.

Each cycle is a whole session: attach (adopting the resident part, recovery
survey, handler check), one batch retargeting 100 call sites A -> B, and the
revert on detach. Zero crashes, the target's own checksum exact, and its text
byte-identical to the file at the end.

Cycles: TEXTPOKE_CHAOS_CYCLES (default 50).
"""

from __future__ import annotations

import time

from textpoke.poke import Patch, attach
from textpoke.sites import SiteKind, find_sites
from textpoke.x86.insn import encode_call

from .harness import Target, env_count, read_mem, symbols, text_section
from .targets import build_chaos, check_result

SITES = 100


def test_attach_patch_detach_cycles(tmp_path):
    cycles = env_count("TEXTPOKE_CHAOS_CYCLES", 50)
    binary = build_chaos(tmp_path, SITES)
    syms = symbols(binary)
    sites = [s.address for s in find_sites(binary, kinds={SiteKind.CALL}, functions=["caller_*"], calls_to=["A"])]
    assert len(sites) == SITES
    batch = [Patch(site=s, old=encode_call(s, syms["A"]), new=encode_call(s, syms["B"])) for s in sites]
    text_addr, text_bytes = text_section(binary)
    target = Target([str(binary), "4"])
    installs = 0
    started = time.monotonic()
    try:
        for cycle in range(cycles):
            with attach(target.pid) as session:
                installs += session.resident.created
                assert not session.recovery.written, f"cycle {cycle}: a previous detach left sites changed"
                result = session.apply(batch)
                assert (len(result.patched), result.syncs) == (SITES, 3)
                assert read_mem(target.pid, sites[cycle % SITES], 5) == batch[cycle % SITES].new
            assert target.alive(), f"cycle {cycle}: the target died"
        elapsed = time.monotonic() - started
        assert read_mem(target.pid, text_addr, len(text_bytes)) == text_bytes
        result = target.stop()
    finally:
        target.kill()
    check_result(result, SITES)
    assert installs == 1  # installed once, adopted by every later attach
    assert result["b"] > 0
    summary = (f"attach/patch/detach cycles: {cycles} in {elapsed:.1f} s, 0 crashes; calls made {result['made']}, "
               f"A {result['a']}, B {result['b']}, bad 0, checksums exact, text identical to the file")
    print(summary)
    (tmp_path.parent / "cycles-summary.txt").write_text(summary + "\n")
