"""Which 5-byte sites a binary has, found from its ELF tables and by decoding.

A site is a single 5-byte instruction at an instruction boundary:

- **fentry**: the ``nop5`` gcc puts at a function's entry for
  ``-pg -mfentry -mnop-mcount``; its address is recorded in ``__mcount_loc``
  with ``-mrecord-mcount``; without that section, a ``nop5`` that is the
  function's first instruction (after ``endbr64``) qualifies.
- **call** / **jmp**: every ``call rel32`` / ``jmp rel32`` met when decoding each
  symbol-table function linearly from its start to its end with iced-x86.  Only
  what the decoder reached from the function start counts, so a site is always a
  real instruction start, never bytes inside another instruction.

Addresses are link-time addresses plus ``base`` (the load bias of a mapped copy).
"""

from __future__ import annotations

import enum
import fnmatch
import os
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from iced_x86 import Code, Decoder, Instruction

from ..x86.insn import CALL_SIZE, NOP5
from .elf import MCOUNT_SECTION, PATCHABLE_SECTION, ElfImage, Function, open_elf


class SiteKind(enum.Enum):
    """What kind of site an instruction is (by how it got there, not its current bytes)."""

    FENTRY = "fentry"
    CALL = "call"
    JMP = "jmp"


DEFAULT_KINDS: frozenset[SiteKind] = frozenset({SiteKind.FENTRY, SiteKind.CALL})

REASON_MCOUNT = f"fentry nop5 recorded in {MCOUNT_SECTION}"
REASON_PATCHABLE = f"nop5 recorded in {PATCHABLE_SECTION}"
REASON_ENTRY = f"nop5 is the function's first instruction (not recorded in {MCOUNT_SECTION})"
REASON_CALL = "call rel32 at an instruction boundary decoded from the function start"
REASON_JMP = "jmp rel32 at an instruction boundary decoded from the function start"


@dataclass(frozen=True)
class Site:
    """One patchable 5-byte instruction."""

    address: int
    kind: SiteKind
    #: The 5 bytes there now: the file's bytes, or the live bytes for a process.
    insn: bytes
    function: str
    offset_in_function: int
    #: For call/jmp: where the file's instruction goes (relocated), else None.
    target: int | None
    target_name: str | None
    #: Why this is a safe site.
    reason: str
    #: For a live process: the bytes in the ELF file; None when read from a file.
    file_insn: bytes | None = None

    @property
    def changed(self) -> bool:
        """The live bytes differ from the file (patched, or mid-patch)."""
        return self.file_insn is not None and self.file_insn != self.insn

    @property
    def location(self) -> str:
        return f"{self.function}+{self.offset_in_function:#x}"


@dataclass(frozen=True)
class SiteScan:
    """The sites of one binary and what the scan could not use."""

    path: str
    base: int
    sites: tuple[Site, ...]
    #: Functions decoded (after ``functions`` filtering).
    functions_scanned: int
    #: Functions whose decoding met an invalid instruction (data in text): skipped.
    undecodable: tuple[str, ...]
    #: Recorded fentry locations that are not usable, with why: ``(address, why)``.
    refused: tuple[tuple[int, str], ...]

    @property
    def functions_with_sites(self) -> int:
        return len({site.function for site in self.sites})


# -- matching -----------------------------------------------------------------


def compile_globs(globs: Sequence[str]) -> Callable[[Collection[str]], bool] | None:
    """A predicate "any of these names matches any glob" (case-sensitive), or None."""
    if not globs:
        return None
    pattern = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
    match = pattern.match
    return lambda names: any(match(name) for name in names)


# -- scanning -----------------------------------------------------------------


def _image(path_or_elf: str | os.PathLike[str] | ElfImage) -> ElfImage:
    return path_or_elf if isinstance(path_or_elf, ElfImage) else open_elf(path_or_elf)


def _entry_boundary(image: ElfImage, function: Function, address: int) -> bool:
    """Whether decoding from ``function``'s start lands exactly on ``address``."""
    data = image.read(function.address, address - function.address + CALL_SIZE)
    if data is None:
        return False
    decoder = Decoder(64, data, ip=function.address)
    instr = Instruction()
    while decoder.can_decode and decoder.ip < address:
        decoder.decode_out(instr)
        if instr.code == Code.INVALID:
            return False
    return decoder.ip == address


def _entry_after_endbr(image: ElfImage, function: Function) -> int | None:
    """Address of the function's first instruction, skipping an ``endbr64``
    (-fcf-protection builds put the fentry nop5 after it)."""
    data = image.read(function.address, min(function.size, 16))
    if not data:
        return None
    instr = Decoder(64, data, ip=function.address).decode()
    if instr.code == Code.ENDBR64:
        return function.address + instr.len
    return function.address


def _fentry_sites(
    image: ElfImage, base: int, wanted: Callable[[Function], bool]
) -> tuple[list[Site], list[tuple[int, str]]]:
    sites: list[Site] = []
    refused: list[tuple[int, str]] = []
    recorded = [(a, REASON_MCOUNT) for a in image.mcount_locs]
    recorded += [(a, REASON_PATCHABLE) for a in image.patchable_entries]
    if not image.has_mcount_section:
        # No record: a function whose first instruction (after endbr64) is a nop5.
        for function in image.functions:
            if not wanted(function):
                continue
            entry = _entry_after_endbr(image, function)
            if entry is not None and image.read(entry, CALL_SIZE) == NOP5:
                recorded.append((entry, REASON_ENTRY))
    seen: set[int] = set()
    for address, reason in recorded:
        if address in seen:
            continue
        seen.add(address)
        owner = image.function_at(address)
        if owner is None:
            refused.append((address, "recorded address is in no symbol-table function"))
            continue
        if not wanted(owner):
            continue
        insn = image.read(address, CALL_SIZE)
        if insn != NOP5:
            shown = insn.hex(" ") if insn else "unreadable"
            refused.append((address, f"recorded address holds {shown}, not nop5"))
            continue
        if not _entry_boundary(image, owner, address):
            refused.append((address, "recorded address is not an instruction boundary"))
            continue
        sites.append(
            Site(
                address=address + base,
                kind=SiteKind.FENTRY,
                insn=insn,
                function=owner.name,
                offset_in_function=address - owner.address,
                target=None,
                target_name=None,
                reason=reason,
            )
        )
    return sites, refused


def _branch_sites(
    image: ElfImage,
    base: int,
    functions: Sequence[Function],
    *,
    calls: bool,
    jmps: bool,
) -> tuple[list[Site], list[str]]:
    """Decode each function once; collect 5-byte call/jmp rel32 instructions."""
    sites: list[Site] = []
    undecodable: list[str] = []
    # Sentinels that never equal a real code keep the hot loop to two compares.
    call_code = Code.CALL_REL32_64 if calls else -1
    jmp_code = Code.JMP_REL32_64 if jmps else -1
    invalid = Code.INVALID
    instr = Instruction()
    names: dict[int, str | None] = {}
    for function in functions:
        data = image.read(function.address, function.size)
        if data is None:
            undecodable.append(function.name)
            continue
        decoder = Decoder(64, data, ip=function.address)
        decode = decoder.decode_out
        found: list[tuple[int, int, SiteKind, int]] = []
        ok = True
        while decoder.can_decode:
            decode(instr)
            code = instr.code
            if code == call_code or code == jmp_code:
                # len 5 rules out prefixed forms (e.g. ``bnd call``): not one 5-byte site.
                if instr.len == CALL_SIZE:
                    kind = SiteKind.CALL if code == call_code else SiteKind.JMP
                    found.append((instr.ip, instr.ip - function.address, kind, instr.near_branch_target))
            elif code == invalid:
                ok = False
                break
        if not ok:
            # Data or padding the decoder cannot read: boundaries after it are guesses.
            undecodable.append(function.name)
            continue
        for ip, offset, kind, target in found:
            if target not in names:
                names[target] = image.name_of(target)
            sites.append(
                Site(
                    address=ip + base,
                    kind=kind,
                    insn=data[offset : offset + CALL_SIZE],
                    function=function.name,
                    offset_in_function=offset,
                    target=target + base,
                    target_name=names[target],
                    reason=REASON_CALL if kind is SiteKind.CALL else REASON_JMP,
                )
            )
    return sites, undecodable


def scan_sites(
    path_or_elf: str | os.PathLike[str] | ElfImage,
    *,
    kinds: Collection[SiteKind] = DEFAULT_KINDS,
    functions: Sequence[str] = (),
    calls_to: Sequence[str] = (),
    base: int = 0,
) -> SiteScan:
    """Find sites and account for what was skipped; see :func:`find_sites`."""
    image = _image(path_or_elf)
    kinds = frozenset(kinds)
    function_match = compile_globs(functions)

    def wanted(function: Function) -> bool:
        return function_match is None or function_match(function.names)

    selected = [fn for fn in image.functions if wanted(fn)]
    sites: list[Site] = []
    refused: list[tuple[int, str]] = []
    undecodable: list[str] = []
    callee_match = compile_globs(calls_to)
    # A fentry site has no callee: with calls_to, only call/jmp sites can match.
    if SiteKind.FENTRY in kinds and callee_match is None:
        fentry, refused = _fentry_sites(image, base, wanted)
        sites += fentry
    if SiteKind.CALL in kinds or SiteKind.JMP in kinds:
        branches, undecodable = _branch_sites(
            image,
            base,
            selected,
            calls=SiteKind.CALL in kinds,
            jmps=SiteKind.JMP in kinds,
        )
        if callee_match is not None:
            branches = [
                s
                for s in branches
                if s.target is not None and callee_match(image.names_of(s.target - base))
            ]
        sites += branches
    # Overlapping symbols can yield one address twice; keep the innermost function's.
    unique: dict[int, Site] = {}
    for site in sites:
        kept = unique.get(site.address)
        if kept is None or site.offset_in_function < kept.offset_in_function:
            unique[site.address] = site
    return SiteScan(
        path=image.path,
        base=base,
        sites=tuple(sorted(unique.values(), key=lambda s: s.address)),
        functions_scanned=len(selected),
        undecodable=tuple(undecodable),
        refused=tuple(refused),
    )


def find_sites(
    path: str | os.PathLike[str] | ElfImage,
    *,
    kinds: Collection[SiteKind] = DEFAULT_KINDS,
    functions: Sequence[str] = (),
    calls_to: Sequence[str] = (),
    base: int = 0,
) -> list[Site]:
    """The sites of the ELF at ``path``, sorted by address, at link address + ``base``.

    ``functions`` and ``calls_to`` are fnmatch globs over function names (any
    alias) and callee names (``malloc`` also matches ``malloc@plt``); with
    ``calls_to`` only call/jmp sites are returned.
    """
    return list(
        scan_sites(path, kinds=kinds, functions=functions, calls_to=calls_to, base=base).sites
    )


__all__ = [
    "SiteKind",
    "Site",
    "SiteScan",
    "DEFAULT_KINDS",
    "find_sites",
    "scan_sites",
    "compile_globs",
]
