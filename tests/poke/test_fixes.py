"""The fix ledger (poke/fixes.py) on fake memory: records, the state word, reconcile."""

from __future__ import annotations

import struct

import numpy as np

from textpoke.poke.fixes import HEADER, IN, MAGIC, OUT, VERSION, FixLedger
from textpoke.poke.ledger import Ledger
from textpoke.x86.insn import NOP5, encode_jmp


class FakeMemory:
    """Process.read/write over a bytearray at address 0."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.pid = 1

    def read(self, address: int, size: int) -> bytes:
        return bytes(self.data[address : address + size])

    def write(self, address: int, data: bytes) -> None:
        self.data[address : address + len(data)] = data


def _fresh() -> tuple[FakeMemory, FixLedger, Ledger]:
    memory = FakeMemory(1 << 16)
    memory.write(0, struct.pack("<QIIQQ", MAGIC, VERSION, 0, 0, 0))
    return memory, FixLedger(memory, 0), Ledger(bytearray(Ledger.size_for(64)), capacity=64)


SITES = [0x401000, 0x402000]
NEW = [encode_jmp(site, 0x3FE000) for site in SITES]


def _baselines(ledger: Ledger) -> list[bytes | None]:
    return [ledger.baseline(site) for site in SITES]


def test_a_record_counts_only_once_written_whole():
    memory, fixes, _ = _fresh()
    record = fixes.append(sites=SITES, old=[NOP5, NOP5], new=NEW, meta={"name": "f"})
    (read,) = fixes.records()
    assert read == record and read.state == OUT and read.meta == {"name": "f"} and read.new == tuple(NEW)
    # A record written past `used` but not counted (the tool died before the header write) is not there.
    used = struct.unpack_from("<Q", memory.data, 16)[0]
    memory.write(HEADER + used, b"\xff" * 64)
    assert len(fixes.records()) == 1


def test_reconcile_follows_the_state_word():
    _, fixes, ledger = _fresh()
    record = fixes.append(sites=SITES, old=[NOP5, NOP5], new=NEW, meta={})
    # The batch recorded the sites (baseline = original = nop5) and ran; killed before the state word:
    ledger.record_many(np.asarray(SITES, dtype=np.uint64), np.frombuffer(NOP5 * 2, dtype=np.uint8).reshape(2, 5))
    assert fixes.reconcile(ledger) == 0 and _baselines(ledger) == [NOP5, NOP5]  # not at all
    fixes.set_state(record, IN)  # the commit point
    assert fixes.reconcile(ledger) == 2 and _baselines(ledger) == NEW  # whole
    assert fixes.reconcile(ledger) == 0
    # Half the baselines committed by a revert that died: the state word (OUT) decides.
    ledger.commit(SITES[0], NOP5)
    fixes.set_state(record, OUT)
    assert fixes.reconcile(ledger) == 1 and _baselines(ledger) == [NOP5, NOP5]
    assert [ledger.original(site) for site in SITES] == [NOP5, NOP5]  # originals never change


def test_reconcile_leaves_unknown_sites_alone():
    _, fixes, ledger = _fresh()
    record = fixes.append(sites=SITES, old=[NOP5, NOP5], new=NEW, meta={})
    fixes.set_state(record, IN)
    assert fixes.reconcile(ledger) == 0 and _baselines(ledger) == [None, None]


def test_all_out():
    _, fixes, ledger = _fresh()
    first = fixes.append(sites=SITES[:1], old=[NOP5], new=NEW[:1], meta={"name": "a"})
    fixes.append(sites=SITES[1:], old=[NOP5], new=NEW[1:], meta={"name": "b"})
    fixes.set_state(first, IN)
    assert fixes.set_all_out() == 1
    assert [r.state for r in fixes.records()] == [OUT, OUT]
