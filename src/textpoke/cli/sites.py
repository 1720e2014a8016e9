"""``textpoke sites``: list the patchable 5-byte sites of a binary or a process."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence

import click

from .._errors import UsageError
from ..sites import Site, SiteKind, SiteScan, scan_process, scan_sites

_KIND_NAMES = [kind.value for kind in SiteKind]
#: Above this many rows a rich table costs seconds to lay out; plain text is instant.
_RICH_MAX_ROWS = 2000


def _site_json(site: Site) -> dict[str, object]:
    entry: dict[str, object] = {
        "address": site.address,
        "address_hex": f"{site.address:#x}",
        "kind": site.kind.value,
        "bytes": site.insn.hex(),
        "function": site.function,
        "offset": site.offset_in_function,
        "target": site.target,
        "target_name": site.target_name,
        "reason": site.reason,
    }
    if site.file_insn is not None:
        entry["file_bytes"] = site.file_insn.hex()
        entry["changed"] = site.changed
    return entry


def _row(site: Site) -> tuple[str, str, str, str, str]:
    target = site.target_name or (f"{site.target:#x}" if site.target is not None else "")
    if site.changed and site.file_insn is not None:
        target = f"{target}  CHANGED (file: {site.file_insn.hex(' ')})".strip()
    return (f"{site.address:#x}", site.kind.value, site.location, site.insn.hex(" "), target)


_HEADER = ("address", "kind", "function", "bytes", "target")


def _print_table(sites: Sequence[Site]) -> None:
    rows = [_row(site) for site in sites]
    if sys.stdout.isatty() and len(rows) <= _RICH_MAX_ROWS:
        from rich.console import Console
        from rich.table import Table

        table = Table(*_HEADER, box=None, pad_edge=False)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(_HEADER[:-1])]
    lines = []
    for row in (_HEADER, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    click.echo("\n".join(lines))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _summary(scan: SiteScan, shown: int) -> str:
    counts = Counter(site.kind for site in scan.sites)
    parts = [f"{counts[SiteKind.FENTRY]} fentry", f"{counts[SiteKind.CALL]} call"]
    if counts[SiteKind.JMP]:
        parts.append(f"{counts[SiteKind.JMP]} jmp")
    text = (
        f"{_plural(len(scan.sites), 'site')}: {', '.join(parts)} "
        f"in {_plural(scan.functions_with_sites, 'function')}"
    )
    notes = []
    if scan.functions_scanned == 0:
        notes.append("no symbol-table function matched")
    if shown < len(scan.sites):
        notes.append(f"{shown} shown")
    changed = sum(1 for site in scan.sites if site.changed)
    if changed:
        notes.append(f"{changed} changed in memory")
    if scan.undecodable:
        notes.append(f"{len(scan.undecodable)} undecodable functions skipped")
    if scan.refused:
        notes.append(f"{len(scan.refused)} recorded fentry locations refused")
    return text + (f" ({'; '.join(notes)})" if notes else "")


@click.command("sites")
@click.argument("binary_or_pid")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(_KIND_NAMES),
    help="Site kinds to list (repeatable; default: fentry and call).",
)
@click.option("-f", "--function", "functions", multiple=True, metavar="GLOB", help="Only sites in functions matching GLOB.")
@click.option("--calls-to", "calls_to", multiple=True, metavar="SYM", help="Only call/jmp sites whose callee matches SYM (a glob; malloc matches malloc@plt).")
@click.option("--lib", "lib", metavar="PATH_OR_NAME", help="With a pid: a mapped library (path or name substring such as libc.so) instead of the executable.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of sites.")
@click.option("--limit", type=click.IntRange(min=0), metavar="N", help="Show at most N sites (the summary counts all).")
def command(
    binary_or_pid: str,
    kinds: tuple[str, ...],
    functions: tuple[str, ...],
    calls_to: tuple[str, ...],
    lib: str | None,
    as_json: bool,
    limit: int | None,
) -> None:
    """List the patchable 5-byte sites of BINARY_OR_PID (a file, or a pid)."""
    selected = frozenset(SiteKind(k) for k in kinds) or frozenset({SiteKind.FENTRY, SiteKind.CALL})
    if binary_or_pid.isdigit():
        process_scan = scan_process(
            int(binary_or_pid), path=lib, kinds=selected, functions=functions, calls_to=calls_to
        )
        scan = process_scan.scan
    else:
        if lib is not None:
            raise UsageError(
                "--lib selects a library mapped in a process; it needs a pid",
                hint=f"run `textpoke sites {lib}` to list the sites of a library file",
            )
        scan = scan_sites(binary_or_pid, kinds=selected, functions=functions, calls_to=calls_to)
    shown = scan.sites if limit is None else scan.sites[:limit]
    if as_json:
        click.echo(json.dumps([_site_json(site) for site in shown], indent=None))
        return
    if shown:
        _print_table(shown)
    click.echo(_summary(scan, len(shown)))
