"""Choosing what a capture patches, and what its recording needs to name it.

Everything here reads the process (its ELF files and live bytes) and writes
nothing, so a selection that matches nothing is refused before any byte of the
target changes, and, for a program started by ``record``, before it runs an
instruction of its own (it is held at its entry point meanwhile).
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Sequence
from dataclasses import replace

from .._errors import SymbolNotFound, TextpokeError
from ..ring.file import ChunkKind, RecordingWriter
from ..ring.reader import SiteTable
from ..ring.recording import SiteInfo, Symbols
from ..sites import Site, SiteKind, scan_process, symbol_ranges
from ..sites.explain import no_function, nothing_found, what
from ..trampolines.tracer import StubKind, TracedSite
from ..x86.insn import INT3, JMP_OPCODE, NOP5, SITE_SIZE, rel32_target
from .options import CaptureOptions


def select_sites(pid: int, options: CaptureOptions, *, listing: str) -> tuple[list[Site], int]:
    """The sites to patch (unchanged ones only) and how many were skipped as already changed.

    ``listing`` is the command that lists what there is to choose from, for the
    hint (``textpoke sites PID`` for a running process, ``textpoke sites PROGRAM``
    for one ``record`` starts). A fentry site holds nop5 or ``call __fentry__`` in
    the file; unchanged, either is patched alike."""
    functions = tuple(g for g in options.functions if g)  # "" selects every function
    kinds = {SiteKind.CALL} if options.calls_to else {SiteKind.FENTRY}
    scan = scan_process(pid, path=options.library, kinds=kinds, functions=functions,
                        calls_to=options.calls_to).scan
    assert scan.image is not None
    lib = f" --lib {shlex.quote(options.library)}" if options.library else ""
    if functions and scan.functions_scanned == 0:
        raise no_function(scan.image, functions, sites_command=listing + lib)
    if not len(scan.columns):
        raise nothing_found(scan, sites_command=listing + lib, library_option=True)
    found = scan.sites
    # Unchanged sites, and those holding an int3 over the file's bytes: someone's
    # breakpoint (a debugger's, a uprobe's) or textpoke's own in flight. The batch tells
    # (skip_foreign: a foreign one is left out, named, and nothing is written there).
    usable = [s if not s.changed else replace(s, insn=s.file_insn) for s in found
              if not s.changed or _under_int3(s)]
    usable += _fixed_functions(pid, [s for s in found if s.changed and not _under_int3(s)])
    if not usable:
        where = options.library or "the main executable"
        raise SymbolNotFound(f"every one of the {len(found)} {what(scan.query)} in {where} is already changed in "
                             "memory", hint=f"see what holds them with `{listing}{lib}`; end the other session, "
                                            f"revert the hot-fix that holds them (`textpoke hotfix -p {pid} --list`; "
                                            "--calls-to traces the calls of a fixed function) "
                                            "or run `textpoke recover` on the process")
    return usable, len(found) - len(usable)


def _fixed_functions(pid: int, changed: Sequence[Site]) -> list[Site]:
    """Fentry sites that hold a hot-fix's ``jmp`` (hotfix/apply.py): the fixed function's
    own fentry site instead, named after the function it replaces (the fix was
    built with fentry calls, which textpoke made nop5 sites when it linked it)."""
    jumps = [s for s in changed if s.kind is SiteKind.FENTRY and s.insn[:1] == JMP_OPCODE.to_bytes(1, "little")]
    if not jumps:
        return []
    from ..poke.fixes import fix_entry_sites
    from ..target.process import Process

    with Process(pid) as process:
        entries = fix_entry_sites(process)
        live = {site: process.read(site, SITE_SIZE) for site, _ in entries.values()}
    chosen = []
    for s in jumps:
        entry = entries.get(rel32_target(s.address, s.insn))
        if entry is not None and live[entry[0]] == NOP5:
            site, fix = entry
            chosen.append(replace(s, address=site, insn=NOP5, file_insn=None, function=f"{s.function} [{fix}]",
                                  offset_in_function=0, reason=f"fentry nop5 of hot-fix {fix}'s {s.function}"))
    return chosen


def _under_int3(site: Site) -> bool:
    return site.file_insn is not None and site.insn == INT3 + site.file_insn[len(INT3):]


def symbols(pid: int) -> Symbols:
    """Function and PLT ranges of every object mapped in the process, at runtime addresses
    (callers in shared libraries are named too)."""
    return Symbols(*symbol_ranges(pid))


class SymbolsChunk:
    """Reads the process's symbols (every mapped object's ELF file: a large C library
    takes 100 ms and more) in a thread of its own while the trace runs, and writes
    them as the recording's SYMBOLS chunk: names matter only to readers, so the sites
    are patched without waiting for them. :meth:`join` before the file is finished."""

    def __init__(self, pid: int, writer: RecordingWriter) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(pid, writer), name="textpoke-symbols",
                                        daemon=True)
        self._thread.start()

    def _run(self, pid: int, writer: RecordingWriter) -> None:
        try:
            found = symbols(pid)
        except TextpokeError:  # the process went away: callers stay addresses
            return
        try:
            writer.write_json(ChunkKind.SYMBOLS, found.to_json())
        except BaseException as exc:  # the file failed: the capture reports it
            self.error = exc

    def join(self) -> None:
        self._thread.join()


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
