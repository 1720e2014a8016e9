"""``textpoke sites``: list the patchable 5-byte sites of a binary or a process.

For a process, a site whose bytes in memory differ from the file's is shown
as what the process runs now (its instruction and target) beside its
original: textpoke's ledger's when textpoke changed it, else the file's.
The table is formatted from the scan's columns, so listing 20,000 sites
builds no object per site.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import click
import numpy as np

from .._errors import TextpokeError, UsageError
from ..sites import SiteKind, SiteScan, scan_process, scan_sites
from ..sites.site import KINDS, REASONS, branch_target
from ..sites.elf import ElfImage
from ..sites.explain import no_function, nothing_found, stripped_note
from ..x86.insn import CALL_OPCODE, INT3_BYTE, NOP5

_KIND_NAMES = [kind.value for kind in SiteKind]
#: Above this many rows a rich table costs seconds to lay out; plain text is instant.
_RICH_MAX_ROWS = 2000
_HEADER = ("address", "kind", "function", "bytes", "target")


@dataclass(frozen=True)
class _Original:
    """What a changed site held before: its bytes and where they came from."""

    insn: bytes
    source: str  # "file" | "ledger"


def _describe(address: int, insn: bytes, name_of: dict[int, str | None]) -> str:
    """``call malloc@plt``, ``nop5``, ``int3`` or the bytes, for an instruction at ``address``."""
    if insn == NOP5:
        return "nop5"
    target = branch_target(address, insn)
    if target is not None:
        mnemonic = "call" if insn[0] == CALL_OPCODE else "jmp"
        return f"{mnemonic} {name_of.get(target) or f'{target:#x}'}"
    if insn and insn[0] == INT3_BYTE:
        return "int3"
    return insn.hex(" ")


def _ledger(pid: int, addresses: Sequence[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """(original, instruction in flight) of the given sites from textpoke's ledger in ``pid``,
    read without attaching; empty where textpoke never changed the site or cannot tell."""
    from ..poke.recover import inspect
    from ..target.process import Process

    wanted = set(addresses)
    try:
        with Process(pid) as process:
            _, states = inspect(process)
    except (TextpokeError, OSError):
        return {}, {}
    originals = {s.site: s.original for s in states if s.site in wanted and s.original is not None}
    in_flight = {s.site: s.effective for s in states if s.site in wanted and s.in_flight}
    return originals, in_flight


class _Rows:
    """The table's text columns, built from a scan's arrays."""

    def __init__(self, scan: SiteScan, index: np.ndarray, pid: int | None) -> None:
        image = scan.image
        assert image is not None
        cols = scan.columns
        self.scan = scan
        self.index = index
        names = image.table.display
        base = scan.base
        self.addresses = cols.address[index].tolist()
        kinds = cols.kind[index].tolist()
        self.kinds = [KINDS[k].value for k in kinds]
        functions = cols.function[index].tolist()
        offsets = cols.offset[index].tolist()
        self.functions = [f"{names[f]}+{o:#x}" for f, o in zip(functions, offsets)]
        insn = cols.insn[index]
        self.insns = [row.tobytes() for row in insn]
        self.bytes = [b.hex(" ") for b in self.insns]
        target_names: dict[int, str | None] = {}
        self.target_names: list[str | None] = []
        for t in cols.target[index].tolist():
            if t and t not in target_names:
                target_names[t] = image.name_of(t - base)
            self.target_names.append(target_names.get(t) if t else None)
        self.targets = [n or (f"{t:#x}" if t else "") for n, t in zip(self.target_names, cols.target[index].tolist())]
        self.file_insns = [row.tobytes() for row in cols.file_insn[index]] if cols.file_insn is not None else None
        self.changed = cols.changed[index].tolist()
        # Changed sites: what runs now, and the original beside it.
        self.now: dict[int, str] = {}
        self.now_target: dict[int, tuple[int | None, str | None]] = {}
        self.original: dict[int, tuple[_Original, str]] = {}
        changed_rows = [i for i, c in enumerate(self.changed) if c]
        if changed_rows and pid is not None and self.file_insns is not None:
            sites = [self.addresses[i] for i in changed_rows]
            originals, in_flight = _ledger(pid, sites)
            labels = dict(scan.current_names)
            for i in changed_rows:
                address = self.addresses[i]
                runs = in_flight.get(address, self.insns[i])
                target = branch_target(address, runs)
                if target is not None and target not in labels:
                    labels.update(_name_more(pid, [target]))
                for source_insn in (originals.get(address), self.file_insns[i]):
                    t = branch_target(address, source_insn) if source_insn else None
                    if t is not None and t not in labels:
                        labels[t] = image.name_of(t - base)
                now = _describe(address, runs, labels)
                if address in in_flight:
                    now = f"{now} (int3 in place: a textpoke batch in flight)"
                elif self.insns[i][0] == INT3_BYTE:
                    now = "int3 not placed by textpoke (a debugger's or a uprobe's breakpoint)"
                self.now[i] = now
                self.now_target[i] = (target, labels.get(target) if target is not None else None)
                original = _Original(originals[address], "ledger") if address in originals else \
                    _Original(self.file_insns[i], "file")
                self.original[i] = (original, _describe(address, original.insn, labels))

    def text(self, i: int) -> tuple[str, str, str, str, str]:
        target = self.targets[i]
        if i in self.now:
            original, shown = self.original[i]
            whence = "textpoke's ledger" if original.source == "ledger" else "the file"
            target = f"now: {self.now[i]}; original: {shown} ({original.insn.hex(' ')}, from {whence})"
        return (f"{self.addresses[i]:#x}", self.kinds[i], self.functions[i], self.bytes[i], target)

    def json(self, i: int) -> dict[str, object]:
        cols = self.scan.columns
        row = int(self.index[i])
        target = int(cols.target[row]) or None
        entry: dict[str, object] = {
            "address": self.addresses[i],
            "address_hex": f"{self.addresses[i]:#x}",
            "kind": self.kinds[i],
            "bytes": self.bytes[i].replace(" ", ""),
            "function": self.functions[i].rsplit("+", 1)[0],
            "offset": int(cols.offset[row]),
            "target": target,
            "target_name": self.target_names[i],
            "reason": REASONS[int(cols.reason[row])],
        }
        if self.file_insns is not None:
            entry["file_bytes"] = self.file_insns[i].hex()
            entry["changed"] = bool(self.changed[i])
        if i in self.now:
            original, shown = self.original[i]
            now_target, now_name = self.now_target[i]
            entry["now"] = {"insn": self.now[i], "bytes": self.insns[i].hex(), "target": now_target,
                            "target_name": now_name}
            entry["original"] = {"insn": shown, "bytes": original.insn.hex(), "source": original.source}
        return entry


def _name_more(pid: int, addresses: list[int]) -> dict[int, str | None]:
    from ..sites.process import name_addresses

    return name_addresses(pid, addresses)


def _print_table(rows: _Rows) -> None:
    addresses = [f"{a:#x}" for a in rows.addresses]
    targets = list(rows.targets)
    for i in rows.now:
        targets[i] = rows.text(i)[-1]
    columns = (addresses, rows.kinds, rows.functions, rows.bytes, targets)
    if sys.stdout.isatty() and len(addresses) <= _RICH_MAX_ROWS:
        from rich.console import Console
        from rich.table import Table

        table = Table(*_HEADER, box=None, pad_edge=False)
        for line in zip(*columns):
            table.add_row(*line)
        Console().print(table)
        return
    widths = [max(len(h), max(map(len, column), default=0)) for h, column in zip(_HEADER, columns)]
    template = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    lines = [template.format(*_HEADER).rstrip()]
    lines += [template.format(*line).rstrip() for line in zip(*columns)]
    click.echo("\n".join(lines))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _summary(scan: SiteScan, shown: int) -> str:
    counts = np.bincount(scan.columns.kind, minlength=len(KINDS)).tolist()
    parts = [f"{counts[0]} fentry", f"{counts[1]} call"]
    if counts[2]:
        parts.append(f"{counts[2]} jmp")
    total = len(scan.columns)
    text = f"{_plural(total, 'site')}: {', '.join(parts)} in {_plural(scan.functions_with_sites, 'function')}"
    notes = []
    if shown < total:
        notes.append(f"{shown} shown")
    if scan.changed:
        notes.append(f"{scan.changed} changed in memory")
    if scan.undecodable:
        notes.append(f"{_plural(len(scan.undecodable), 'undecodable function')} skipped")
    if scan.refused:
        notes.append(f"{_plural(len(scan.refused), 'recorded fentry location')} refused")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _note(text: str) -> None:
    click.echo(f"textpoke: note: {text}", err=True)


def _lib_with_a_file(binary: str, lib: str, argv_rest: list[str]) -> UsageError:
    """``--lib`` given with a file: name the library file the binary would load."""
    from ..sites.elf import open_elf
    from ..sites.libraries import find_needed

    message = "--lib selects a library mapped in a process; it needs a pid"
    try:
        image = open_elf(binary)
        found = [(n, p) for n, p in find_needed(image, binary, lib) if p]
    except TextpokeError:
        found = []
    rest = shlex.join(argv_rest)
    if len(found) == 1:
        command = shlex.join(["textpoke", "sites", found[0][1]]) + (f" {rest}" if rest else "")
        return UsageError(message, hint=f"{binary} loads {found[0][0]} from {found[0][1]}: `{command}`")
    if found:
        return UsageError(message, hint="the libraries it loads that match: " + ", ".join(p for _, p in found))
    return UsageError(message, hint=f"give the library's path: `textpoke sites /path/to/{lib}*`, or a pid with --lib")


@click.command("sites")
@click.argument("binary_or_pid")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(_KIND_NAMES),
    help="Site kinds to list (repeatable; default: fentry and call).",
)
@click.option("-f", "--function", "functions", multiple=True, metavar="GLOB",
              help="Only sites in functions matching GLOB (C++: demangled `ns::Foo::*` or mangled names; "
              "stripped binaries: sub_<address>).")
@click.option("--calls-to", "calls_to", multiple=True, metavar="SYM",
              help="Only call/jmp sites whose callee matches SYM (a glob; malloc matches malloc@plt). "
              "Works on any binary, stripped ones too.")
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
    """List the patchable 5-byte sites of BINARY_OR_PID (a file, or a pid).

    Names come from the symbol table, a separate debug file
    (/usr/lib/debug/.build-id), or, in a stripped binary, .dynsym and
    .eh_frame (unnamed functions are sub_<address>). For a pid, a site
    changed in memory shows what runs now and its original.
    """
    selected = frozenset(SiteKind(k) for k in kinds) or frozenset({SiteKind.FENTRY, SiteKind.CALL})
    options: list[str] = [arg for k in kinds for arg in ("--kind", k)]
    options += [arg for f in functions for arg in ("-f", f)]
    options += [arg for c in calls_to for arg in ("--calls-to", c)]
    pid: int | None = None
    if binary_or_pid.isdigit():
        pid = int(binary_or_pid)
        scan = scan_process(pid, path=lib, kinds=selected, functions=functions, calls_to=calls_to).scan
        sites_command = f"textpoke sites {pid}" + (f" --lib {shlex.quote(lib)}" if lib else "")
    else:
        if lib is not None:
            raise _lib_with_a_file(binary_or_pid, lib, options)
        scan = scan_sites(binary_or_pid, kinds=selected, functions=functions, calls_to=calls_to)
        sites_command = f"textpoke sites {shlex.quote(binary_or_pid)}"
    image: ElfImage | None = scan.image
    assert image is not None
    if scan.query.functions and scan.functions_scanned == 0:
        raise no_function(image, scan.query.functions, sites_command=sites_command)
    total = len(scan.columns)
    count = total if limit is None else min(limit, total)
    rows = _Rows(scan, np.arange(count), pid)
    if as_json:
        click.echo(json.dumps([rows.json(i) for i in range(count)], indent=None))
    else:
        if count:
            _print_table(rows)
        click.echo(_summary(scan, count))
    note = stripped_note(image)
    if note is not None:
        _note(note)
    if scan.refused and total:
        for why, count in Counter(why for _, why in scan.refused).most_common(3):
            _note(f"{_plural(count, 'recorded fentry location')} refused: {why}")
    if not total:
        why = nothing_found(scan, sites_command=sites_command, library_option=pid is not None)
        _note(why.message)
        if why.hint:
            click.echo(f"textpoke: hint: {why.hint}", err=True)


__all__ = ["command"]
