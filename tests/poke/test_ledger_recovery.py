"""The ledger and recovery, without a process: kill the tool at every store.

A simulated tool does what Session.apply does (ledger records at Step.VERIFIED,
then the batch protocol) and dies at its k-th operation: a table or ledger
store, a text write or a sync; a dead tool does nothing more (no rollback runs,
as after SIGKILL). Recovery (survey + plan_recovery + one resumed batch) must
then leave every site exactly at its baseline, whatever k was; also when the
recovery itself is killed and run again.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from textpoke.poke.ledger import Ledger
from textpoke.poke.protocol import Patch, Step, apply_batch
from textpoke.poke.recover import Restore, SiteState, plan_recovery, survey
from textpoke.poke.resident import CODE_SIZE, TABLE_OFFSET, ctl_size, ledger_offset, region_size
from textpoke.poke.table import SiteTable
from textpoke.x86.insn import INT3_BYTE, NOP5, encode_call, encode_jmp

CAPACITY = 64
BASE = 0x40_1000
SITES = [BASE + 16 * i for i in range(12)]


class Killed(BaseException):
    """The tool got SIGKILL."""


class Tool:
    """Counts operations and dies at the ``kill_at``-th (None: never)."""

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at
        self.ops = 0
        self.dead = False

    def op(self) -> None:
        if self.dead:
            raise Killed
        self.ops += 1
        if self.kill_at is not None and self.ops >= self.kill_at:
            self.dead = True
            raise Killed


class Text:
    def __init__(self, memory: bytearray, tool: Tool) -> None:
        self.memory, self.tool = memory, tool

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.memory[addr - BASE : addr - BASE + n])

    def write(self, addr: int, data: bytes) -> None:
        self.tool.op()
        self.memory[addr - BASE : addr - BASE + len(data)] = data


class Table:
    """The shared table, as a dying tool stores into it."""

    def __init__(self, table: SiteTable, tool: Tool) -> None:
        self.table, self.tool = table, tool

    def lookup(self, site: int) -> bytes | None:
        return self.table.lookup(site)

    def publish(self, site: int, insn: bytes) -> None:
        self.tool.op()
        self.table.publish(site, insn)

    @property
    def headroom(self) -> int:
        return self.table.headroom


def _session_batches(memory, table, ledger, batches, tool: Tool) -> None:
    """Session.apply for each batch: ledger records at VERIFIED, then the protocol."""
    text, shared = Text(memory, tool), Table(table, tool)
    for batch in batches:
        def record(step: Step, batch=batch) -> None:
            if step is Step.VERIFIED:
                for patch in batch:
                    tool.op()
                    ledger.record(patch.site, patch.old)

        apply_batch(batch, text=text, sync=tool.op, table=shared, on_step=record)


def _recover(memory, table, ledger, tool: Tool) -> tuple[list[Patch], list[int], list[int]]:
    states = survey(Text(memory, tool), table, ledger)
    plan = plan_recovery(states, Restore.BASELINE)
    apply_batch(plan[0], text=Text(memory, tool), sync=tool.op, table=Table(table, tool), resume=True)
    return plan


def _insns(draw, site: int) -> bytes:
    kind = draw(st.sampled_from(["nop", "call", "jmp"]))
    target = BASE + 0x8000 + 16 * draw(st.integers(0, 64))
    return NOP5 if kind == "nop" else (encode_call if kind == "call" else encode_jmp)(site, target)


@st.composite
def histories(draw):
    """Original text, then batches (each a toggle to a new instruction and back, or a change)."""
    original = {site: _insns(draw, site) for site in SITES}
    current = dict(original)
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        chosen = draw(st.lists(st.sampled_from(SITES), min_size=1, max_size=len(SITES), unique=True))
        batch = []
        for site in chosen:
            new = _insns(draw, site)
            batch.append(Patch(site=site, old=current[site], new=new))
            current[site] = new
        batches.append(batch)
    return original, batches


def _text(original: dict[int, bytes]) -> bytearray:
    memory = bytearray(b"\x90" * (SITES[-1] + 16 - BASE))
    for site, insn in original.items():
        memory[site - BASE : site - BASE + 5] = insn
    return memory


@settings(max_examples=30, deadline=None)
@given(histories(), st.data())
def test_recovery_after_a_kill_at_any_operation(history, data):
    original, batches = history
    # Count the operations of the whole history once, then kill at each point in turn.
    probe = Tool(None)
    _session_batches(_text(original), SiteTable(bytearray(SiteTable.size_for(CAPACITY)), capacity=CAPACITY),
                     Ledger(bytearray(Ledger.size_for(CAPACITY)), capacity=CAPACITY), batches, probe)
    total = probe.ops
    for kill_at in range(1, total + 2):
        memory = _text(original)
        table = SiteTable(bytearray(SiteTable.size_for(CAPACITY)), capacity=CAPACITY)
        ledger = Ledger(bytearray(Ledger.size_for(CAPACITY)), capacity=CAPACITY)
        try:
            _session_batches(memory, table, ledger, batches, Tool(kill_at))
        except Killed:
            pass
        # The next attach may itself be killed: then one more recovery finishes it.
        second_kill = data.draw(st.integers(1, 3 * len(SITES) + 6), label="recovery kill")
        try:
            _recover(memory, table, ledger, Tool(second_kill))
        except Killed:
            pass
        _recover(memory, table, ledger, Tool(None))
        assert memory == _text(original), f"killed at operation {kill_at} of {total}"
        for site, insn in original.items():
            assert table.lookup(site) in (None, insn)  # every entry holds what its site holds
        assert _recover(memory, table, ledger, Tool(None))[0] == [
            Patch(site=s.site, old=original[s.site], new=original[s.site])
            for s in survey(Text(memory, Tool(None)), table, ledger)
        ]


def test_commit_moves_the_baseline_not_the_original():
    ledger = Ledger(bytearray(Ledger.size_for(CAPACITY)), capacity=CAPACITY)
    site, a, b = SITES[0], encode_call(SITES[0], BASE + 0x8000), encode_call(SITES[0], BASE + 0x9000)
    assert ledger.record(site, a) is True
    assert ledger.record(site, b) is False  # the original is written once
    ledger.commit(site, b)
    assert (ledger.original(site), ledger.baseline(site), len(ledger)) == (a, b, 1)
    assert [(e.site, e.original, e.baseline) for e in ledger.entries()] == [(site, a, b)]
    assert ledger.record(SITES[1], NOP5, baseline=a) is True
    assert (ledger.original(SITES[1]), ledger.baseline(SITES[1])) == (NOP5, a)
    assert ledger.baseline(SITES[2]) is None and SITES[2] not in ledger


def test_record_stores_the_baseline_before_the_original():
    """Crash order: a site with an original always has its baseline."""
    buffer = bytearray(Ledger.size_for(CAPACITY))
    ledger = Ledger(buffer, capacity=CAPACITY)
    stores: list[str] = []
    for name, table in (("original", ledger.originals), ("baseline", ledger.baselines)):
        publish = table.publish
        table.publish = lambda site, insn, publish=publish, name=name: (stores.append(name), publish(site, insn))
    ledger.record(SITES[0], NOP5)
    assert stores == ["baseline", "original"]


def test_recovery_goals_and_effective_instruction():
    site = SITES[0]
    a, b = encode_call(site, BASE + 0x8000), encode_call(site, BASE + 0x9000)
    in_flight = SiteState(site, bytes([INT3_BYTE]) + b[1:], entry=b, original=a, baseline=b)
    assert (in_flight.in_flight, in_flight.effective) == (True, b)
    assert (in_flight.goal(Restore.BASELINE), in_flight.goal(Restore.ORIGINAL)) == (b, a)
    foreign_int3 = SiteState(site, bytes([INT3_BYTE]) + a[1:], entry=None, original=a, baseline=a)
    assert (foreign_int3.in_flight, foreign_int3.effective) == (False, foreign_int3.current)
    patches, foreign, held = plan_recovery([in_flight, foreign_int3], Restore.ORIGINAL)
    assert (patches, foreign, held) == ([Patch(site=site, old=b, new=a)], [site], [])
    whole = SiteState(SITES[1], b, entry=b, original=a, baseline=a)
    patches, foreign, held = plan_recovery([whole, in_flight], Restore.ORIGINAL, sigtrap_blocked=True)
    assert (patches, foreign, held) == (
        [Patch(site=SITES[1], old=b, new=b), Patch(site=site, old=b, new=a)], [], [SITES[1]])


def test_control_region_layout():
    """The ledger follows the table and fits before the agent's stack."""
    table = SiteTable.size_for(CAPACITY)
    assert ledger_offset(CAPACITY) == TABLE_OFFSET + table
    assert ctl_size(CAPACITY) >= ledger_offset(CAPACITY) + Ledger.size_for(CAPACITY) == TABLE_OFFSET + 3 * table
    assert ctl_size(CAPACITY) % 4096 == 0
    assert region_size(CAPACITY) == CODE_SIZE + ctl_size(CAPACITY) + 64 * 1024
