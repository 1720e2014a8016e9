"""Saying exactly what was looked for, and why nothing was found.

Used by ``textpoke sites`` and by the commands that trace (``record``,
``trace``) when a selection comes back empty: each message names what was
asked for (no "glob" when none was given), what the binary is (stripped, no
fentry build, a PIE fentry build), and a hint with a command that works.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Sequence

from .._errors import SiteError, SymbolNotFound, TextpokeError
from .discover import (
    FENTRY_SYMBOL,
    REFUSED_GOT_CALL,
    Query,
    SiteKind,
    SiteScan,
)
from .elf import MCOUNT_SECTION, ElfImage, Origin
from .libraries import resolve_all
from .names import compile_glob

#: How to build a program so that every function has a fentry site (gcc, Debian's default PIE too).
FENTRY_RECIPE = ("compile with `-pg -mfentry -mnop-mcount -mrecord-mcount -fno-pie` and link with "
                 "`-no-pie` (without -pg)")


def _quoted(globs: Sequence[str]) -> str:
    return ", ".join(repr(g) for g in globs)


def what(query: Query) -> str:
    """``call sites to 'malloc'``, ``fentry sites in functions matching 'work*'``, ``sites``..."""
    if query.calls_to:
        kinds = [k for k in (SiteKind.CALL, SiteKind.JMP) if k in query.kinds] or [SiteKind.CALL]
        text = f"{' and '.join(k.value for k in kinds)} sites to {_quoted(query.calls_to)}"
    else:
        order = [k.value for k in (SiteKind.FENTRY, SiteKind.CALL, SiteKind.JMP) if k in query.kinds]
        text = f"{' or '.join(order)} sites"
    if query.functions:
        text += f" in functions matching {_quoted(query.functions)}"
    return text


def stripped_note(image: ElfImage) -> str | None:
    """One line saying what a binary without a symbol table still offers, or None."""
    if image.local_names:
        return None
    table = image.table
    unnamed = int((table.origin == Origin.EH_FRAME).sum())
    exported = int((table.origin == Origin.DYNSYM).sum())
    mini = int((table.origin == Origin.DEBUG).sum())
    parts = [f"{exported} exported (.dynsym)"]
    if mini:
        parts.append(f"{mini} named by .gnu_debugdata")
    parts.append(f"{unnamed} unnamed from .eh_frame, shown as sub_<address>")
    build = image.build_id.hex() if image.build_id else None
    debug = (f"; its debug symbols would be /usr/lib/debug/.build-id/{build[:2]}/{build[2:]}.debug"
             if build else "")
    return (f"{image.path} is stripped: its {len(table)} functions are {', '.join(parts)}; "
            f"call sites are found in all of them, into the PLT too (--calls-to malloc){debug}")


def _close_names(image: ElfImage, globs: Sequence[str]) -> list[str]:
    import difflib  # only when a name matched nothing (10 ms at start-up otherwise)

    names = image.table.display
    found: list[str] = []
    for glob in globs:
        plain = glob.strip("*?")
        found += difflib.get_close_matches(plain, names, n=3, cutoff=0.75)
    return list(dict.fromkeys(found))[:3]


def _command(image: ElfImage, sites_command: str | None) -> str:
    return sites_command or f"textpoke sites {shlex.quote(image.path)}"


def no_function(image: ElfImage, globs: Sequence[str], *, sites_command: str | None = None) -> SymbolNotFound:
    """The error for ``-f GLOB`` matching no function of ``image``."""
    sites_command = _command(image, sites_command)
    message = f"no function of {image.path} matches {_quoted(globs)}"
    if not image.local_names:
        table = image.table
        message += (f" ({image.path} is stripped: only its {int((table.origin == Origin.DYNSYM).sum())} "
                    f"exported functions have names, the {int((table.origin == Origin.EH_FRAME).sum())} "
                    "others are sub_<address>)")
        hint = (f"what works on it: exported names, sub_<address> names (`{sites_command} --kind call` lists "
                "them), call sites into its libraries (--calls-to malloc), --lib for a library; "
                "or install its debug symbols")
        return SymbolNotFound(message, hint=hint)
    close = _close_names(image, globs)
    hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
            else f"list its functions with `{sites_command} --kind fentry --kind call`")
    return SymbolNotFound(message, hint=hint)


def _libraries_calling(image: ElfImage, calls_to: Sequence[str]) -> list[tuple[str, str]]:
    """``(needed name, path)`` of the libraries this binary loads that import a wanted callee."""
    from .elf import open_elf

    match = compile_glob(calls_to)
    assert match is not None
    found = []
    for needed, path in resolve_all(image, image.path):
        if not path:
            continue
        try:
            library = open_elf(path)
        except TextpokeError:
            continue
        if any(match(name) for name in library.imports):
            found.append((needed, path))
    return found


def nothing_found(scan: SiteScan, *, sites_command: str | None = None, library_option: bool = False
                  ) -> TextpokeError:
    """Why ``scan`` found no site, as one error with a hint that works.

    ``sites_command`` is how the user lists this object's sites (``textpoke
    sites PID --lib libc.so``; default: ``textpoke sites FILE``, which works
    without a process); ``library_option``: the user's command takes ``--lib
    NAME`` (``trace``, ``record``, ``sites PID``), so a library that calls the
    wanted function is suggested that way, else by its path.
    """
    image = scan.image
    assert image is not None
    given_command = sites_command is not None
    sites_command = _command(image, sites_command)
    query = scan.query
    looked_for = what(query)
    if query.functions and scan.functions_scanned == 0:
        return no_function(image, query.functions, sites_command=sites_command)
    if query.calls_to:
        match = compile_glob(query.calls_to)
        assert match is not None
        known = any(match(name) for stub in image.plt for name in image.names_of(stub)) or \
            len(image.table.select(query.calls_to)) > 0
        message = f"no {looked_for} in {image.path}"
        if scan.undecodable:
            message += f" ({len(scan.undecodable)} undecodable functions skipped)"
        if not known:
            message += f": it neither defines nor imports {_quoted(query.calls_to)}"
            libraries = _libraries_calling(image, query.calls_to)
            if libraries:
                needed, path = libraries[0]
                wanted = shlex.quote(query.calls_to[0])
                if not library_option:
                    return SymbolNotFound(message, hint=f"{needed} calls it: `textpoke sites {shlex.quote(path)} "
                                                        f"--kind call --calls-to {wanted}`")
                if given_command:
                    lister = f"{sites_command.split(' --lib ')[0]} --lib {shlex.quote(needed)}"
                else:
                    lister = f"textpoke sites {shlex.quote(path)}"
                return SymbolNotFound(message, hint=f"{needed} calls it: add --lib {needed} (`{lister} --kind call "
                                                    f"--calls-to {wanted}` lists those sites)")
            return SymbolNotFound(message, hint=f"list the callees with `{sites_command} --kind call`")
        return SymbolNotFound(message, hint=f"list the call sites with `{sites_command} --kind call`")
    if SiteKind.FENTRY in query.kinds:
        if scan.refused:
            reasons = Counter(why for _, why in scan.refused)
            why, count = reasons.most_common(1)[0]
            message = (f"none of the {len(scan.refused)} recorded fentry locations of {image.path} is a site: "
                       f"{why}" if count == len(scan.refused) else
                       f"{len(scan.refused)} recorded fentry locations of {image.path} refused, e.g. {why}")
            if why == REFUSED_GOT_CALL:
                return SiteError(message, hint=FENTRY_RECIPE + "; or trace call sites with --calls-to NAME")
            return SiteError(message, hint=f"{FENTRY_RECIPE}, or trace call sites with --calls-to NAME")
        if not image.has_mcount_section and not (query.kinds - {SiteKind.FENTRY}):
            return SiteError(
                f"no fentry sites in {image.path}: it was not built with -pg -mfentry (no {MCOUNT_SECTION} "
                f"section, and no function starts with nop5 or call {FENTRY_SYMBOL})",
                hint=f"{FENTRY_RECIPE}; without rebuilding, trace call sites with --calls-to NAME "
                f"(`{sites_command} --kind call` lists them)",
            )
        if query.functions and not (query.kinds - {SiteKind.FENTRY}):
            return SiteError(
                f"{scan.functions_scanned} functions match {_quoted(query.functions)} in {image.path} but "
                "none has an fentry site (compiled without -pg -mfentry, or marked notrace)",
                hint=f"{FENTRY_RECIPE}, or trace their call sites with --calls-to NAME",
            )
    return SiteError(f"no {looked_for} in {image.path}", hint=f"list every site with `{sites_command}`")


__all__ = ["FENTRY_RECIPE", "no_function", "nothing_found", "stripped_note", "what"]
