"""Test doubles for the poke stage: a process's text in a bytearray, a sync that
counts, and a reference emulation written from first principles (not through
textpoke.x86.emulate) to check handle_int3 against."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st

from textpoke.poke.protocol import Patch
from textpoke.poke.spec import Emulated
from textpoke.poke.table import SiteTable
from textpoke.x86.insn import CALL_OPCODE, JMP_OPCODE, NOP5, InsnKind, encode_call, encode_jmp

#: Where the fake text lives, and how big it is.
BASE = 0x40_1000
TEXT_SIZE = 2048
#: The trapped thread's stack pointer in simulations (16-byte aligned, like at a call).
THREAD_SP = 0x7FFD_1234_5670


class FakeText:
    """A process's code as a bytearray at ``base``: the TextAccess of the tests.

    ``log`` records every write (and, when given, shares its list with a sync
    and a table spy so tests can check the global order of operations).
    ``fail_write`` decides, per write, whether it raises instead of writing;
    ``after_write`` runs after each write (a simulated thread looking at the code).
    """

    def __init__(
        self,
        base: int,
        data: bytes | bytearray,
        *,
        log: list[tuple[str, int, bytes]] | None = None,
        fail_write: Callable[[int, bytes], bool] | None = None,
        after_write: Callable[[], None] | None = None,
    ) -> None:
        self.base = base
        self.memory = bytearray(data)
        self.log = log if log is not None else []
        self.fail_write = fail_write
        self.after_write = after_write
        self.reads = 0

    def _offset(self, addr: int, n: int) -> int:
        offset = addr - self.base
        assert 0 <= offset and offset + n <= len(self.memory), f"access {addr:#x}+{n} outside text"
        return offset

    def read(self, addr: int, n: int) -> bytes:
        self.reads += 1
        offset = self._offset(addr, n)
        return bytes(self.memory[offset : offset + n])

    def write(self, addr: int, data: bytes) -> None:
        offset = self._offset(addr, len(data))
        if self.fail_write is not None and self.fail_write(addr, data):
            raise OSError(f"injected write failure at {addr:#x}")
        self.log.append(("write", addr, bytes(data)))
        self.memory[offset : offset + len(data)] = data
        if self.after_write is not None:
            self.after_write()

    def at(self, site: int) -> bytes:
        offset = self._offset(site, 5)
        return bytes(self.memory[offset : offset + 5])


class BatchWritingText(FakeText):
    """A FakeText that also offers ``write_many`` and records each call."""

    def __init__(self, base: int, data: bytes | bytearray) -> None:
        super().__init__(base, data)
        self.write_many_calls: list[list[tuple[int, bytes]]] = []

    def write_many(self, writes: list[tuple[int, bytes]]) -> None:
        self.write_many_calls.append(list(writes))
        for addr, data in writes:
            self.write(addr, data)


@dataclass
class FakeSync:
    """``sync()`` that counts, logs, and can run a hook (a simulated thread)."""

    log: list[tuple[str, int, bytes]] = field(default_factory=list)
    calls: int = 0
    hook: Callable[[], None] | None = None

    def __call__(self) -> None:
        self.calls += 1
        self.log.append(("sync", 0, b""))
        if self.hook is not None:
            self.hook()


class TableSpy:
    """A SiteTable that logs publishes into a shared log."""

    def __init__(self, table: SiteTable, log: list[tuple[str, int, bytes]]) -> None:
        self.table = table
        self.log = log

    def lookup(self, site: int) -> bytes | None:
        return self.table.lookup(site)

    def publish(self, site: int, insn: bytes) -> None:
        self.log.append(("publish", site, bytes(insn)))
        self.table.publish(site, insn)

    @property
    def headroom(self) -> int:
        return self.table.headroom


def new_table(capacity: int = 64) -> SiteTable:
    return SiteTable(bytearray(SiteTable.size_for(capacity)), capacity=capacity)


def reference_effect(site: int, insn: bytes, *, sp: int, word_size: int = 8) -> Emulated:
    """What executing the 5-byte ``insn`` at ``site`` does, computed by hand."""
    mask = (1 << (8 * word_size)) - 1
    end = (site + 5) & mask
    if insn == NOP5:
        return Emulated(ip=end, sp=sp, stores=())
    target = (site + 5 + int.from_bytes(insn[1:], "little", signed=True)) & mask
    if insn[0] == JMP_OPCODE:
        return Emulated(ip=target, sp=sp, stores=())
    assert insn[0] == CALL_OPCODE, insn.hex()
    new_sp = (sp - word_size) & mask
    return Emulated(ip=target, sp=new_sp, stores=((new_sp, end),))


def encode(kind: InsnKind, site: int, target: int) -> bytes:
    if kind is InsnKind.NOP:
        return NOP5
    if kind is InsnKind.CALL:
        return encode_call(site, target)
    return encode_jmp(site, target)


@dataclass(frozen=True)
class Scenario:
    """A batch over a fake text: the original bytes and the patches."""

    original: bytes
    patches: tuple[Patch, ...]

    def text(self, **kwargs: object) -> FakeText:
        return FakeText(BASE, self.original, **kwargs)  # type: ignore[arg-type]

    def image_after(self) -> bytes:
        """The whole text once every patch is applied."""
        data = bytearray(self.original)
        for patch in self.patches:
            data[patch.site - BASE : patch.site - BASE + 5] = patch.new
        return bytes(data)


_forms = st.tuples(
    st.sampled_from(list(InsnKind)), st.integers(BASE - 2**24, BASE + 2**24)
)


@st.composite
def scenarios(draw: st.DrawFn, *, min_sites: int = 0, max_sites: int = 16) -> Scenario:
    """Random non-overlapping sites (some adjacent) with random old/new among
    nop5/call/jmp, in random order, over random filler bytes."""
    gaps = draw(st.lists(st.integers(0, 90), min_size=min_sites, max_size=max_sites))
    offset = draw(st.integers(0, 8))
    sites: list[int] = []
    for gap in gaps:
        offset += gap
        assert offset + 5 <= TEXT_SIZE
        sites.append(BASE + offset)
        offset += 5
    patches = []
    for site in sites:
        old_kind, old_target = draw(_forms)
        new_kind, new_target = draw(_forms)
        patches.append(
            Patch(
                site=site,
                old=encode(old_kind, site, old_target),
                new=encode(new_kind, site, new_target),
            )
        )
    order = draw(st.permutations(patches))
    filler = bytearray(random.Random(draw(st.integers(0, 2**32))).randbytes(TEXT_SIZE))
    for patch in patches:
        filler[patch.site - BASE : patch.site - BASE + 5] = patch.old
    return Scenario(original=bytes(filler), patches=tuple(order))
