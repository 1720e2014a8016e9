"""What a site is: :class:`Site` for one, :class:`SiteColumns` for many (numpy), and a scan.

A scan keeps its sites as columns; :class:`Site` objects are made only for
the rows a caller asks for (:func:`materialize`, ``SiteScan.sites``).  The
reasons a site is safe, and why a recorded fentry location is refused, are
spelled here once.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from ..x86.insn import CALL_OPCODE, CALL_SIZE, JMP_OPCODE
from ._arrays import unique
from .elf import MCOUNT_SECTION, PATCHABLE_SECTION

if TYPE_CHECKING:
    from .elf import ElfImage


class SiteKind(enum.Enum):
    """What kind of site an instruction is (by how it got there, not its current bytes)."""

    FENTRY = "fentry"
    CALL = "call"
    JMP = "jmp"


DEFAULT_KINDS: frozenset[SiteKind] = frozenset({SiteKind.FENTRY, SiteKind.CALL})
KINDS: tuple[SiteKind, ...] = (SiteKind.FENTRY, SiteKind.CALL, SiteKind.JMP)
_KIND_CODE = {kind: code for code, kind in enumerate(KINDS)}

#: The name of the function ``-pg -mfentry`` calls at every entry.
FENTRY_SYMBOL = "__fentry__"

REASON_MCOUNT = f"fentry nop5 recorded in {MCOUNT_SECTION}"
REASON_PATCHABLE = f"nop5 recorded in {PATCHABLE_SECTION}"
REASON_ENTRY = f"nop5 is the function's first instruction (not recorded in {MCOUNT_SECTION})"
REASON_CALL = "call rel32 at an instruction boundary decoded from the function start"
REASON_JMP = "jmp rel32 at an instruction boundary decoded from the function start"
REASON_FENTRY_CALL = f"fentry call {FENTRY_SYMBOL} recorded in {MCOUNT_SECTION}"
REASON_FENTRY_CALL_ENTRY = (f"call {FENTRY_SYMBOL} is the function's first instruction "
                            f"(not recorded in {MCOUNT_SECTION})")
REASONS: tuple[str, ...] = (REASON_MCOUNT, REASON_PATCHABLE, REASON_ENTRY, REASON_CALL, REASON_JMP,
                            REASON_FENTRY_CALL, REASON_FENTRY_CALL_ENTRY)
_R_MCOUNT, _R_PATCHABLE, _R_ENTRY, _R_CALL, _R_JMP, _R_FCALL, _R_FCALL_ENTRY = range(len(REASONS))

#: Why a recorded fentry location is not a site (the CLI groups refusals by these).
REFUSED_GOT_CALL = (f"call *{FENTRY_SYMBOL}@GOTPCREL(%rip) is a 6-byte instruction (a PIE build); textpoke "
                    "rewrites 5-byte ones: build with -fno-pie -no-pie (add -mnop-mcount for a nop5)")
REFUSED_ONE_BYTE_NOPS = ("five 1-byte nops (-fpatchable-function-entry) are five instructions, and a thread "
                         "may stand between them: build with -pg -mfentry -mnop-mcount -mrecord-mcount")
REFUSED_NO_FUNCTION = "recorded address is in no known function"
REFUSED_NOT_BOUNDARY = "recorded address is not an instruction boundary"

@dataclass(frozen=True)
class Site:
    """One patchable 5-byte instruction."""

    address: int
    kind: SiteKind
    #: The 5 bytes there now: the file's bytes, or the live bytes for a process.
    insn: bytes
    function: str
    offset_in_function: int
    #: Where the file's instruction goes (relocated): the callee of a call/jmp,
    #: ``__fentry__`` for a fentry ``call``; None for a nop5.
    target: int | None
    target_name: str | None
    #: Why this is a safe site.
    reason: str
    #: For a live process: the bytes in the ELF file; None when read from a file.
    file_insn: bytes | None = None
    #: For a live process whose bytes changed: where the instruction there now goes
    #: (a call/jmp), and its name; None when unchanged or not a call/jmp.
    current_target: int | None = None
    current_target_name: str | None = None

    @property
    def changed(self) -> bool:
        """The live bytes differ from the file (patched, or mid-patch)."""
        return self.file_insn is not None and self.file_insn != self.insn

    @property
    def location(self) -> str:
        return f"{self.function}+{self.offset_in_function:#x}"


@dataclass(frozen=True, eq=False)
class SiteColumns:
    """Sites as parallel arrays, sorted by address (see :class:`Site` for the fields)."""

    address: np.ndarray  # uint64, runtime
    kind: np.ndarray  # uint8: index into KINDS
    insn: np.ndarray  # (n, 5) uint8: the bytes there now
    function: np.ndarray  # int64: index into the image's FunctionTable
    offset: np.ndarray  # uint64: offset in the function
    target: np.ndarray  # uint64, runtime; 0 = none
    reason: np.ndarray  # uint8: index into REASONS
    file_insn: np.ndarray | None = None  # (n, 5) uint8 for a process, else None

    def __len__(self) -> int:
        return len(self.address)

    @staticmethod
    def empty() -> SiteColumns:
        return SiteColumns(np.zeros(0, np.uint64), np.zeros(0, np.uint8), np.zeros((0, CALL_SIZE), np.uint8),
                           np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                           np.zeros(0, np.uint8))

    def take(self, index: np.ndarray) -> SiteColumns:
        return SiteColumns(self.address[index], self.kind[index], self.insn[index], self.function[index],
                           self.offset[index], self.target[index], self.reason[index],
                           None if self.file_insn is None else self.file_insn[index])

    @staticmethod
    def concat(parts: Sequence[SiteColumns]) -> SiteColumns:
        parts = [p for p in parts if len(p)]
        if not parts:
            return SiteColumns.empty()
        if len(parts) == 1:
            return parts[0]
        return SiteColumns(*(np.concatenate([getattr(p, name) for p in parts])
                             for name in ("address", "kind", "insn", "function", "offset", "target", "reason")))

    @property
    def changed(self) -> np.ndarray:
        """Per site: live bytes differ from the file's (all False for a file scan)."""
        if self.file_insn is None:
            return np.zeros(len(self), dtype=bool)
        return (self.insn != self.file_insn).any(axis=1)


@dataclass(frozen=True)
class Query:
    """What a scan looked for (for messages that say exactly that)."""

    kinds: frozenset[SiteKind] = DEFAULT_KINDS
    functions: tuple[str, ...] = ()
    calls_to: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class SiteScan:
    """The sites of one binary and what the scan could not use."""

    path: str
    base: int
    columns: SiteColumns
    #: Functions selected by the globs (all of them without globs).
    functions_scanned: int
    #: Functions whose decoding met an invalid instruction (data in text): skipped.
    undecodable: tuple[str, ...]
    #: Recorded fentry locations that are not usable, with why: ``(address, why)``.
    refused: tuple[tuple[int, str], ...]
    image: ElfImage | None = None
    query: Query = Query()
    #: For a process: runtime target address -> name, for the targets of changed sites.
    current_names: dict[int, str | None] = field(default_factory=dict)

    @cached_property
    def sites(self) -> tuple[Site, ...]:
        return materialize(self, np.arange(len(self.columns)))

    def __len__(self) -> int:
        return len(self.columns)

    @property
    def functions_with_sites(self) -> int:
        return len(unique(self.columns.function))

    @property
    def changed(self) -> int:
        return int(self.columns.changed.sum())


def materialize(scan: SiteScan, index: np.ndarray) -> tuple[Site, ...]:
    """:class:`Site` objects for rows ``index`` of a scan."""
    cols = scan.columns
    image = scan.image
    assert image is not None
    table = image.table
    base = scan.base
    target_names: dict[int, str | None] = {}
    out = []
    file_insn = cols.file_insn
    changed = cols.changed
    for i in np.asarray(index, dtype=np.int64).tolist():
        target = int(cols.target[i]) or None
        name = None
        if target is not None:
            if target not in target_names:
                target_names[target] = image.name_of(target - base)
            name = target_names[target]
        insn = cols.insn[i].tobytes()
        current_target = current_name = None
        if changed[i]:
            current_target = branch_target(int(cols.address[i]), insn)
            if current_target is not None:
                current_name = scan.current_names.get(current_target)
        out.append(Site(
            address=int(cols.address[i]),
            kind=KINDS[cols.kind[i]],
            insn=insn,
            function=table.name(int(cols.function[i])),
            offset_in_function=int(cols.offset[i]),
            target=target,
            target_name=name,
            reason=REASONS[cols.reason[i]],
            file_insn=None if file_insn is None else file_insn[i].tobytes(),
            current_target=current_target,
            current_target_name=current_name,
        ))
    return tuple(out)


def branch_target(address: int, insn: bytes) -> int | None:
    """Target of the call/jmp rel32 ``insn`` at ``address``; None for anything else."""
    if len(insn) == CALL_SIZE and insn[0] in (CALL_OPCODE, JMP_OPCODE):
        return (address + CALL_SIZE + int.from_bytes(insn[1:], "little", signed=True)) & (2**64 - 1)
    return None


__all__ = [
    "DEFAULT_KINDS",
    "FENTRY_SYMBOL",
    "KINDS",
    "Query",
    "REASONS",
    "REASON_CALL",
    "REASON_ENTRY",
    "REASON_FENTRY_CALL",
    "REASON_FENTRY_CALL_ENTRY",
    "REASON_JMP",
    "REASON_MCOUNT",
    "REASON_PATCHABLE",
    "REFUSED_GOT_CALL",
    "REFUSED_NOT_BOUNDARY",
    "REFUSED_NO_FUNCTION",
    "REFUSED_ONE_BYTE_NOPS",
    "Site",
    "SiteColumns",
    "SiteKind",
    "SiteScan",
    "branch_target",
    "materialize",
]
