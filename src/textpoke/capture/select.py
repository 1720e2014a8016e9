"""Choosing what a capture patches, and what its recording needs to name it.

Everything here reads the process (its ELF files and live bytes) and writes
nothing, so a selection that matches nothing is refused before any byte of the
target changes, and, for a program started by ``record``, before it runs an
instruction of its own (it is held at its entry point meanwhile).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from .._errors import SymbolNotFound, TextpokeError
from ..ring.reader import SiteTable
from ..ring.recording import SiteInfo, Symbols
from ..sites import Site, SiteKind, mapped_object, sites_in_process
from ..trampolines.tracer import StubKind, TracedSite
from ..x86.insn import NOP5
from .options import CaptureOptions


def select_sites(pid: int, options: CaptureOptions, *, listing: str) -> tuple[list[Site], int]:
    """The sites to patch (unchanged ones only) and how many were skipped as already changed.

    ``listing`` is the command that lists what there is to choose from, for the
    hint (``textpoke sites PID`` for a running process, ``textpoke sites PROGRAM``
    for one ``record`` starts)."""
    functions = tuple(g for g in options.functions if g)  # "" selects every function
    kinds = {SiteKind.CALL} if options.calls_to else {SiteKind.FENTRY}
    found = sites_in_process(pid, path=options.library, kinds=kinds, functions=functions,
                             calls_to=options.calls_to)
    usable = [s for s in found if not s.changed and (s.kind is SiteKind.CALL or s.insn == NOP5)]
    if usable:
        return usable, len(found) - len(usable)
    if options.calls_to:
        what = f"call sites to {', '.join(options.calls_to)}"
        if functions:
            what += f" inside {', '.join(functions)}"
    else:
        what = f"fentry sites in {', '.join(functions)}" if functions else "fentry sites"
    where = options.library or "the main executable"
    lib = f" --lib {shlex.quote(options.library)}" if options.library else ""
    if found:
        raise SymbolNotFound(f"every one of the {len(found)} {what} in {where} is already changed in memory",
                             hint=f"see what holds them with `{listing}{lib} --kind "
                                  f"{'call' if options.calls_to else 'fentry'}`; end the other session "
                                  "or run `textpoke recover` on the process")
    if options.calls_to:
        hint = f"list the callees there are with `{listing}{lib} --kind call`"
    else:
        hint = (f"list the functions with `{listing}{lib} --kind fentry`; fentry sites need a build with "
                "-pg -mfentry -mnop-mcount (see the README), or trace call sites with --calls-to")
    raise SymbolNotFound(f"no {what} in {where}", hint=hint)


def symbols(pid: int, library: str | None) -> Symbols:
    """Function and PLT ranges of the main executable (and ``library``), at runtime addresses."""
    ranges: list[tuple[int, int, str]] = []
    for path in dict.fromkeys((None, library)):
        try:
            obj, image = mapped_object(pid, path=path)
        except TextpokeError:
            continue
        ranges += [(obj.base + f.address, obj.base + f.address + max(f.size, 1), f.name) for f in image.functions]
        ranges += [(obj.base + stub, obj.base + stub + 16, name) for stub, name in image.plt.items()]
    return Symbols.from_ranges(ranges)


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return ""
    return shlex.join(argv)


def site_info(sites: Sequence[Site]) -> tuple[SiteInfo, ...]:
    return tuple(SiteInfo(id=i, address=s.address, kind=s.kind.value, function=s.function,
                          target_name=s.target_name if s.kind is SiteKind.CALL else None,
                          target=s.target if s.kind is SiteKind.CALL else None)
                 for i, s in enumerate(sites))


def traced_sites(sites: Sequence[Site]) -> list[TracedSite]:
    return [TracedSite(address=s.address, kind=StubKind.CALL if s.kind is SiteKind.CALL else StubKind.ENTRY,
                       original=s.insn) for s in sites]


def site_table(sites: Sequence[Site]) -> SiteTable:
    """Per site id: is it a call site, and its address (a call record's caller)."""
    return SiteTable.build(is_call=[s.kind is SiteKind.CALL for s in sites], address=[s.address for s in sites])


__all__ = ["command_line", "select_sites", "site_info", "site_table", "symbols", "traced_sites"]
