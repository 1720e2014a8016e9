"""The tracer's stubs and batch, built for every site at once, against the one-site-at-a-time
construction they replaced: the same bytes, the same patches."""

from __future__ import annotations

import random

import numpy as np
import pytest

from textpoke.poke.protocol import Patch
from textpoke.trampolines import tracer
from textpoke.trampolines.tracer import _STUBS, STUB_SIZE, Mode, StubKind, TracedSite, _write_stubs
from textpoke.x86.asm import Asm, R, mem
from textpoke.x86.insn import INT3, NOP5, encode_call, encode_jmp

BASE = 0x4000_0000  # within rel32 reach of the sites and callees
ZERO = 0x7F55_0000_1000
ENTRY_TARGET = BASE + 0x300
CALL_ROUTINE = BASE + 0x500


def reference_stubs(sites: list[TracedSite], *, mode: Mode) -> bytes:
    """The per-site loop generate() had before the stubs were built in bulk."""
    code = bytearray(INT3 * (_STUBS + len(sites) * STUB_SIZE))
    template, imm_at, imm_size = tracer._entry_stub_template()
    for i, site in enumerate(sites):
        at = _STUBS + i * STUB_SIZE
        stub = BASE + at
        callee = site.callee
        if site.kind is StubKind.ENTRY:
            body = bytearray(template)
            value = i << 32 if mode is Mode.TRACE else ZERO + 8 * i
            body[imm_at : imm_at + imm_size] = value.to_bytes(imm_size, "little")
            body += encode_jmp(stub + len(body), ENTRY_TARGET)
        elif site.kind is StubKind.CALL:
            body = bytearray(encode_call(stub, CALL_ROUTINE))
            body += encode_jmp(stub + len(body), callee)
        else:
            hook = Asm()
            slot = tracer._G_REHOOK if site.kind is StubKind.REHOOK else tracer._G_RESTORE
            hook.op("CALL_RM64", mem(R.RIP, BASE + slot))
            body = bytearray(hook.assemble(stub)[0])
            body += encode_jmp(stub + len(body), callee)
        code[at : at + len(body)] = body
    return bytes(code)


def random_sites(seed: int, count: int) -> list[TracedSite]:
    rng = random.Random(seed)
    sites = []
    address = 0x40_1000
    kinds = [StubKind.ENTRY] * 6 + [StubKind.CALL] * 6 + [StubKind.REHOOK, StubKind.RESTORE]
    for _ in range(count):
        address += rng.randrange(5, 200)
        kind = rng.choice(kinds)
        original = NOP5 if kind is StubKind.ENTRY else encode_call(address, 0x40_0000 + rng.randrange(1 << 24))
        sites.append(TracedSite(address=address, kind=kind, original=original))
    return sites


@pytest.mark.parametrize("mode", [Mode.TRACE, Mode.COUNT])
@pytest.mark.parametrize("seed", range(6))
def test_bulk_stubs_are_the_per_site_bytes(mode: Mode, seed: int) -> None:
    sites = random_sites(seed, [1, 2, 17, 300, 2000, 5000][seed])
    code = bytearray(INT3 * (_STUBS + len(sites) * STUB_SIZE))
    _write_stubs(code, base=BASE, sites=sites, mode=mode, zero=ZERO, entry_target=ENTRY_TARGET,
                 call_routine=CALL_ROUTINE, graph_hooks=True)
    assert bytes(code) == reference_stubs(sites, mode=mode)


def test_the_batch_sends_each_site_to_its_stub() -> None:
    """Tracer.patches (a PatchArray): site i, its original bytes, call stub i."""
    sites = [s for s in random_sites(7, 400) if s.kind in (StubKind.ENTRY, StubKind.CALL)]
    addresses, _, original = tracer._site_columns(sites)
    stubs = np.uint64(BASE + _STUBS) + np.arange(len(sites), dtype=np.uint64) * np.uint64(STUB_SIZE)
    from textpoke.poke.bulk import PatchArray
    from textpoke.x86.insn import encode_calls

    batch = PatchArray.build(addresses, original, encode_calls(addresses, stubs))
    assert list(batch) == [Patch(site=s.address, old=s.original, new=encode_call(s.address, BASE + _STUBS + 16 * i))
                           for i, s in enumerate(sites)]
