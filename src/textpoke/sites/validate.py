"""Checking one address given by a user or a later stage: is it a site, and unchanged?"""

from __future__ import annotations

import os

from iced_x86 import Code, Decoder, Formatter, FormatterSyntax, Instruction

from .._errors import NotABoundary, SiteError, SiteMismatch
from ..x86.insn import CALL_SIZE, NOP5
from .discover import (
    REASON_CALL,
    REASON_ENTRY,
    REASON_FENTRY_CALL,
    REASON_FENTRY_CALL_ENTRY,
    REASON_JMP,
    REASON_MCOUNT,
    REASON_PATCHABLE,
    Site,
    SiteKind,
    _entry_after_endbr,
    fentry_targets,
)
from .elf import ElfImage, Function, open_elf


def check_site(
    path_or_elf: str | os.PathLike[str] | ElfImage,
    address: int,
    expected: bytes | None,
    base: int = 0,
    *,
    actual: bytes | None = None,
) -> Site:
    """The site at runtime ``address`` (link address + ``base``), or a refusal.

    Raises :class:`NotABoundary` when decoding the containing function from its
    start does not land on ``address``; :class:`SiteError` when the instruction
    there is not a single 5-byte ``nop5``/``call rel32``/``jmp rel32`` (or is a
    ``nop5`` that is not a function entry: a mid-function nop5 is refused because
    a leaf function may keep live data in its red zone, which emulating a call
    would overwrite); :class:`SiteMismatch` when the bytes differ from
    ``expected``.  ``actual`` gives the current bytes (e.g. read from a live
    process) to compare instead of the file's; the boundary is always decided on
    the file, whose code the process was loaded from.
    """
    image = path_or_elf if isinstance(path_or_elf, ElfImage) else open_elf(path_or_elf)
    link = address - base
    function = image.function_at(link)
    if function is None:
        raise SiteError(
            f"{address:#x} is not inside any function of {image.path}",
            hint="only addresses inside a known function (symbol or .eh_frame) can be checked; "
            "see `textpoke sites`",
        )
    data = image.read(function.address, function.size)
    if data is None:
        raise SiteError(f"{function.name} at {function.address + base:#x} is not in an executable section")
    decoder = Decoder(64, data, ip=function.address)
    instr = Instruction()
    invalid = False
    while decoder.can_decode and decoder.ip < link:
        decoder.decode_out(instr)
        if instr.code == Code.INVALID:
            invalid = True
            break
    where = f"{function.name}+{link - function.address:#x}"
    if invalid or decoder.ip != link:
        covering = "undecodable bytes" if invalid else _describe(instr)
        raise NotABoundary(
            f"{address:#x} ({where}) is not an instruction start: it is inside "
            f"{covering} at {instr.ip + base:#x}"
        )
    instr = decoder.decode()
    file_insn = data[link - function.address : link - function.address + CALL_SIZE]
    kind, reason = _classify(image, function, link, instr, file_insn, where)
    current = file_insn if actual is None else bytes(actual)
    if expected is not None and bytes(expected) != current:
        raise SiteMismatch(
            f"{address:#x} ({where}) holds {current.hex(' ')}, expected {bytes(expected).hex(' ')}"
        )
    target = instr.near_branch_target if instr.code == Code.CALL_REL32_64 or kind is not SiteKind.FENTRY else None
    return Site(
        address=address,
        kind=kind,
        insn=current,
        function=function.name,
        offset_in_function=link - function.address,
        target=None if target is None else target + base,
        target_name=None if target is None else image.name_of(target),
        reason=reason,
        file_insn=None if actual is None else file_insn,
    )


def _describe(instr: Instruction) -> str:
    formatter = Formatter(FormatterSyntax.GAS)
    return f"`{formatter.format(instr)}` ({instr.len} bytes)"


def _classify(
    image: ElfImage, function: Function, link: int, instr: Instruction, insn: bytes, where: str
) -> tuple[SiteKind, str]:
    entry = link == _entry_after_endbr(image, function.address, function.end)
    if instr.len == CALL_SIZE and instr.code == Code.CALL_REL32_64:
        if instr.near_branch_target in fentry_targets(image):
            if link in image.mcount:
                return SiteKind.FENTRY, REASON_FENTRY_CALL
            if entry and not image.has_mcount_section:
                return SiteKind.FENTRY, REASON_FENTRY_CALL_ENTRY
        return SiteKind.CALL, REASON_CALL
    if instr.len == CALL_SIZE and instr.code == Code.JMP_REL32_64:
        return SiteKind.JMP, REASON_JMP
    if insn == NOP5 and instr.len == CALL_SIZE:
        if link in image.mcount:
            return SiteKind.FENTRY, REASON_MCOUNT
        if link in image.patchable:
            return SiteKind.FENTRY, REASON_PATCHABLE
        if entry:
            return SiteKind.FENTRY, REASON_ENTRY
        raise SiteError(
            f"{where} is a nop5 inside the function body, not at its entry",
            hint="a mid-function nop5 may sit under live red-zone data; only entry nops are sites",
        )
    raise SiteError(
        f"{where} holds {_describe(instr)}, not a single 5-byte nop5, call rel32 or jmp rel32",
        hint="only single 5-byte instructions can be patched; see `textpoke sites`",
    )


__all__ = ["check_site"]
