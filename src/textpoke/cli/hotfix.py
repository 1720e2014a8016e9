"""``textpoke hotfix``: load fixed functions into a running process and redirect every call to them.

``textpoke hotfix -p PID fix.c`` (or a prebuilt ``fix.o`` / ``fix.so``): gcc
builds the fix, textpoke links it against the process (the fix's own symbols,
then the program's, static ones included, then its libraries'), writes it into
a new mapping within rel32 reach, and switches every function it replaces in
one batch (fentry ``nop5`` -> ``jmp new``; without a fentry site, every ``call
old`` of the program -> ``call new``, and it says what that cannot catch). The
fix stays after textpoke exits; ``--list`` shows the fixes the process holds
(a later textpoke reads them from the process), ``--revert NAME`` / ``--all``
puts the old functions back (the loaded code stays mapped: a thread may still
be in it; applying the same fix again reuses it). Every refusal (unresolved
symbol, no such function, not x86-64, TLS, constructors, a relocation textpoke
does not handle) comes before anything is written.

The loader (pyelftools, numpy) is imported when the command runs.
"""

from __future__ import annotations

import os

import click

from .._errors import UsageError
from . import target_errors

_HELP = "see `textpoke hotfix --help`"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} bytes"


@click.command("hotfix")
@click.option("-p", "--pid", type=int, required=True, help="The running process.")
@click.argument("fix", required=False, metavar="FIX.c|FIX.o|FIX.so")
@click.option("--replace", "replace", multiple=True, metavar="OLD=NEW",
              help="The fix's NEW replaces the program's OLD (default: each global function of the fix replaces "
                   "the program's function of the same name). Repeatable.")
@click.option("--name", metavar="NAME", help="Name of the fix in --list and --revert (default: the file's stem).")
@click.option("--cflags", metavar="FLAGS", default="", help="More gcc flags for FIX.c (e.g. '-DFIXED -I include').")
@click.option("--list", "list_", is_flag=True, help="Show the fixes the process holds, in force or reverted.")
@click.option("--revert", metavar="NAME", help="Put back the functions fix NAME replaced.")
@click.option("--all", "all_", is_flag=True, help="Revert every fix in force.")
@click.option("--dry-run", is_flag=True, help="Build, link and check everything against the process; write nothing.")
def command(pid: int, fix: str | None, replace: tuple[str, ...], name: str | None, cflags: str, list_: bool,
            revert: str | None, all_: bool, dry_run: bool) -> None:
    """Load a fix into a running process and redirect the functions it replaces; the fix stays."""
    actions = [flag for flag, given in (("FIX", fix), ("--list", list_), ("--revert", revert), ("--all", all_))
               if given]
    if len(actions) != 1:
        raise UsageError("give exactly one of FIX, --list, --revert NAME, --all"
                         + (f" (got {', '.join(actions)})" if actions else ""), hint=_HELP)
    if (replace or name or cflags or dry_run) and fix is None:
        raise UsageError("--replace, --name, --cflags and --dry-run go with FIX", hint=_HELP)
    with target_errors(pid):
        if fix is not None:
            _apply(pid, fix, replace=replace, name=name, cflags=cflags.split(), dry_run=dry_run)
        elif list_:
            _list(pid)
        else:
            _revert(pid, revert)


def _attach(pid: int):  # -> Session
    from ..poke.session import attach

    session = attach(pid)
    if session.recovery is not None and session.recovery.written:
        click.echo(f"textpoke: note: put {_plural(len(session.recovery.written), 'site')} a killed textpoke had "
                   "left half-changed back to their last committed state (fixes: whole or not at all)", err=True)
    return session


def _apply(pid: int, source: str, *, replace: tuple[str, ...], name: str | None, cflags: list[str],
           dry_run: bool) -> None:
    from ..hotfix import hotfix, prepare_fix
    from ..hotfix.apply import FENTRY

    if not os.path.exists(source):
        raise UsageError(f"no such file: {source}", hint="give fix.c, fix.o or fix.so")
    prepared = prepare_fix(pid, source, replace=replace or None, name=name, cflags=cflags)
    if dry_run:
        for r in prepared.redirects:
            where = ", ".join(f"{s:#x}" for s in r.sites[:4]) + (" ..." if len(r.sites) > 4 else "")
            how = "fentry site" if r.kind == FENTRY else _plural(len(r.sites), "call site")
            click.echo(f"would replace {r.old} ({r.old_address:#x}) by the fix's {r.new}: {how} {where}")
        click.echo(f"dry run: {prepared.name} builds, links and resolves against process {pid}; nothing was written")
        return
    session = _attach(pid)
    try:
        applied = hotfix(session, prepared)
    finally:
        session.close(revert=False)
    if applied.result is None:
        click.echo(f"fix {applied.name} is in force already in process {pid} (id {applied.record}); nothing was written")
        return
    code = "reused the code an earlier application loaded" if applied.reused else "loaded"
    click.echo(f"{code}: {applied.name} at {applied.image:#x} ({_size(applied.image_size)})")
    resolved = prepared.target
    names = sorted(_external(prepared))
    if names:
        click.echo("resolved: " + ", ".join(f"{n} ({resolved.origin_of(n)})" for n in names))
    for r in applied.redirects:
        new = applied.functions[r.new]
        if r.kind == FENTRY:
            click.echo(f"replaced {r.old} ({r.old_address:#x}) by {r.new} ({new:#x}): fentry site {r.sites[0]:#x} "
                       "nop5 -> jmp (every call, function pointers included)")
        else:
            click.echo(f"replaced {r.old} ({r.old_address:#x}) by {r.new} ({new:#x}): "
                       f"{_plural(len(r.sites), 'call site')} retargeted")
            click.echo(f"warning: {r.uncaught}", err=True)
    result = applied.result
    click.echo(f"{_plural(len(applied.redirects), 'function')} switched in one batch ({result.syncs} syncs, "
               f"{_plural(len(result.patched), 'site')}); threads already inside an old function finish it there")
    if applied.fentry_sites:
        click.echo(f"`textpoke trace -p {pid} -f {applied.redirects[0].old}` traces the fixed code (its own fentry site)")
    click.echo(f"`textpoke hotfix -p {pid} --revert {applied.name}` puts the old code back")


def _external(prepared) -> set[str]:  # -> names the fix takes from the program and its libraries
    symbols = prepared.fix.symbols
    used = {reloc.symbol for part in prepared.fix.parts for reloc in part.relocs} | {
        reloc.symbol for reloc in prepared.fix.dynamic_relocs}
    return {symbols[k].name for k in used if k and symbols[k].shndx == 0 and symbols[k].name != "__fentry__"}


def _list(pid: int) -> None:
    from ..hotfix import list_fixes

    session = _attach(pid)
    try:
        fixes = list_fixes(session)
    finally:
        session.close(revert=False)
    if not fixes:
        click.echo(f"process {pid} holds no fix")
        return
    for info in fixes:
        state = "in force" if info.in_force else "reverted"
        click.echo(f"{info.name} (id {info.id}): {state}; code at {info.image:#x} ({_size(info.image_size)}), "
                   f"from {info.source}")
        for old, (new, address, kind, sites) in sorted(info.functions.items()):
            how = "fentry site" if kind == "fentry" else _plural(sites, "call site")
            click.echo(f"  {old} -> {new} ({address:#x}) by its {how}")
    live = sum(info.in_force for info in fixes)
    click.echo(f"{live} in force, {len(fixes) - live} reverted (their code stays "
               "mapped, unused)")


def _revert(pid: int, name: str | None) -> None:
    from ..hotfix import revert_fix

    session = _attach(pid)
    try:
        done = revert_fix(session, name)
    finally:
        session.close(revert=False)
    if not done:
        click.echo(f"process {pid} has no fix in force; nothing was written")
        return
    for info in done:
        verb = "runs" if len(info.functions) == 1 else "run"
        click.echo(f"reverted {info.name}: {', '.join(sorted(info.functions))} {verb} the old code again; its code "
                   f"stays mapped at {info.image:#x} (a thread may still be in it)")


__all__ = ["command"]
