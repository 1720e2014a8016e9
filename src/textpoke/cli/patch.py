"""``textpoke patch``: change one or more sites of a running process, and leave them changed.

Everything is checked before anything is written or installed (a refusal
leaves the process exactly as it was): the pid (exists, a live user-space
x86-64 process we may trace), the names (functions, globs), each address (in
the object named by ``--lib``, not in textpoke's own mappings, an instruction
start, a single 5-byte nop5/call/jmp, holding ``--expect``), and the new
instruction's target (executable code). Then one batch writes every site (3
syncs) and the change is committed: it stays after textpoke detaches, and a
later attach keeps it; ``textpoke patch --revert`` or ``textpoke recover`` puts
the original bytes back. ``--dry-run`` runs every one of those checks, and also
finds another session holding the process, and writes nothing.

The sites machinery (pyelftools, iced-x86, numpy) is imported when the command
runs, not when the CLI starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from .._errors import BusyError, OwnCodeRefused, SiteError, SymbolNotFound, TargetStopped, UsageError
from ..target.maps import read_maps
from ..target.process import Process
from ..target.security import check_architecture, ours, owning_mapping
from ..x86.insn import NOP5, SITE_SIZE, decode_site, encode_call, encode_jmp
from . import refuse_foreign_tracer, target_errors

if TYPE_CHECKING:
    from ..sites import MappedObject
    from ..sites.elf import ElfImage

#: An address or an offset: hex with 0x (as objdump prints it) or decimal; no sign.
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)$")
_GLOB_CHARS = set("*?[")
_HELP = "see `textpoke patch --help`"
_SPEC_HINT = "give FUNC+OFFSET (main+0x1c or main+28), a function name, or an address (0x401136)"


@dataclass(frozen=True)
class Planned:
    """One site of the command line, checked, with its new bytes."""

    address: int
    label: str  # function+offset
    old: bytes
    new: bytes

    @property
    def unchanged(self) -> bool:
        """The site holds its new bytes already: the batch leaves it alone."""
        return self.old == self.new


def _number(text: str) -> int | None:
    if not _NUMBER.match(text):
        return None
    return int(text, 16) if text[:2].lower() == "0x" else int(text, 10)


def _sites_hint(obj: MappedObject, functions: str | None = None) -> str:
    lib = f" --lib {os.path.basename(obj.path)}" if obj.path != _exe(obj.pid) else ""
    glob = f" -f '{functions}'" if functions else ""
    return f"see the functions and their sites: `textpoke sites {obj.pid}{lib}{glob}`"


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return ""


def _stripped(obj: MappedObject, what: str) -> SymbolNotFound:
    return SymbolNotFound(
        f"{what}: {obj.path} is stripped (no symbol table): only its exported functions have names, "
        "the others are sub_<address> (from .eh_frame)",
        hint=f"list them with `textpoke sites {obj.pid} --kind call`, or install the program's debug symbols",
    )


def _function(obj: MappedObject, image: ElfImage, name: str) -> tuple[int, int]:
    """Runtime address and size of function ``name`` of the object."""
    for function in image.functions:
        if name in function.names:
            return function.address + obj.base, function.size
    if not image.local_names:
        raise _stripped(obj, f"function {name} not found")
    raise SymbolNotFound(f"function {name} not found in {obj.path}", hint=_sites_hint(obj))


def resolve_function(obj: MappedObject, image: ElfImage, name: str) -> int:
    """Runtime address of function ``name`` of the object."""
    return _function(obj, image, name)[0]


def _check_in_object(obj: MappedObject, address: int) -> None:
    """SiteError, with the ``--lib`` that reaches it, for an address outside ``obj``.

    An address in textpoke's own mappings passes here: it is refused later,
    with its own message (OwnCodeRefused)."""
    if any(address in mapping for mapping in obj.mappings):
        return
    maps = read_maps(obj.pid)
    mapping = owning_mapping(maps, address)
    if mapping is not None and mapping in ours(maps):
        return
    if mapping is not None and mapping.inode and mapping.path.startswith("/"):
        where = mapping.file_path
        if where == _exe(obj.pid):
            hint = "leave out --lib: the address is in the program itself"
        else:
            hint = f"add --lib {os.path.basename(where)} to patch a site of that library"
        raise SiteError(f"{address:#x} is in {where}, not in {obj.path}; nothing was written", hint=hint)
    what = f"in {mapping.path or 'anonymous memory'}" if mapping is not None else "not mapped"
    raise SiteError(f"{address:#x} is not in {obj.path} ({what}); nothing was written",
                    hint=f"give the address of a site of the program: {_sites_hint(obj)}")


def _offset_site(obj: MappedObject, image: ElfImage, spec: str) -> int | None:
    """The address named by FUNC+OFF, or None if ``spec`` is no such form."""
    name, plus, offset_text = spec.rpartition("+")
    if not plus:
        return None
    if any(spec in function.names for function in image.functions):
        return None  # a function whose name has a '+' (C++ operator+): not an offset
    if not name:
        raise UsageError(f"--site {spec!r} has no function name before the '+'", hint=_SPEC_HINT)
    offset = _number(offset_text)
    if offset is None:
        raise UsageError(f"--site {spec!r}: {offset_text!r} is not an offset", hint=_SPEC_HINT)
    start, size = _function(obj, image, name)
    if offset >= size:
        raise SiteError(f"{spec}: offset {offset:#x} is past the end of {name} ({size:#x} bytes long); "
                        "nothing was written", hint=_sites_hint(obj, name))
    return start + offset


def resolve_sites(obj: MappedObject, image: ElfImage, spec: str) -> list[int]:
    """Addresses named by one ``--site``: ADDR, FUNC+OFF, or FUNC/GLOB (fentry sites)."""
    from ..sites import SiteKind, scan_sites

    address = _number(spec)
    if address is not None:
        _check_in_object(obj, address)
        if not image.local_names and image.function_at(address - obj.base) is None:
            raise _stripped(obj, f"cannot check {address:#x}, which is in no function known")
        return [address]
    if spec[:1] in "+-" and _number(spec[1:]) is not None:
        raise UsageError(f"--site {spec!r} is neither an address nor FUNC+OFFSET", hint=_SPEC_HINT)
    address = _offset_site(obj, image, spec)
    if address is not None:
        return [address]
    scan = scan_sites(image, kinds={SiteKind.FENTRY}, functions=[spec], base=obj.base)
    if scan.functions_scanned == 0:
        if not image.local_names:
            raise _stripped(obj, f"no function matches {spec!r}")
        if _GLOB_CHARS & set(spec):
            raise SymbolNotFound(f"no function of {obj.path} matches {spec!r}", hint=_sites_hint(obj))
        raise SymbolNotFound(f"function {spec} not found in {obj.path}", hint=_sites_hint(obj))
    if not scan.sites:
        raise SiteError(
            (f"1 function matches {spec!r} but it has no fentry nop5 site" if scan.functions_scanned == 1 else
             f"{scan.functions_scanned} functions match {spec!r} but none has an fentry nop5 site"),
            hint="give FUNC+OFFSET or an address of a call/jmp site, or build with -pg -mfentry -mnop-mcount "
                 "(README: Trace your own program)",
        )
    return [site.address for site in scan.sites]


def resolve_target(obj: MappedObject, image: ElfImage, spec: str) -> int:
    address = _number(spec)
    return address if address is not None else resolve_function(obj, image, spec)


def _parse_expect(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        value = bytes.fromhex(text.replace(":", " "))
    except ValueError as exc:
        raise UsageError(f"--expect {text!r} is not hex bytes", hint="e.g. --expect 'e8 12 34 56 78'") from exc
    if len(value) != SITE_SIZE:
        raise UsageError(f"--expect has {len(value)} bytes; a site is {SITE_SIZE}", hint="e.g. --expect 'e8 12 34 56 78'")
    return value


def _refuse_ours(pid: int, addresses: Sequence[int]) -> None:
    """OwnCodeRefused for an address inside one of textpoke's mappings in ``pid``."""
    mine = ours(read_maps(pid))
    for address in addresses:
        for mapping in mine:
            if address in mapping or address + SITE_SIZE - 1 in mapping:
                raise OwnCodeRefused(
                    f"{address:#x} is inside textpoke's own code or data in process {pid} "
                    f"({mapping.path.removesuffix(' (deleted)')}); nothing was written"
                )


def _check_process(pid: int) -> None:
    """Exists, a user process, we may trace it (its memory opens), x86-64."""
    with Process(pid):
        pass
    check_architecture(pid)


def plan(pid: int, obj: MappedObject, image: ElfImage, *, specs: Sequence[str], expect: bytes | None,
         new_for: Callable[[int, bytes], bytes]) -> list[Planned]:
    """Check every site (read-only) and compute its new bytes with ``new_for(address, old)``."""
    from ..sites import check_site
    from ..sites.process import read_live

    addresses: list[int] = []
    for spec in specs:
        addresses += resolve_sites(obj, image, spec)
    unique = list(dict.fromkeys(addresses))
    _refuse_ours(pid, unique)
    live = read_live(pid, unique)
    planned = []
    for address in unique:
        site = check_site(image, address, expect, obj.base, actual=live[address])
        planned.append(Planned(address, site.location, site.insn, new_for(address, site.insn)))
    return planned


def _retarget_plan(pid: int, spec: str, lib: str | None) -> list[Planned]:
    from ..sites import SiteKind, mapped_object, scan_sites
    from ..sites.process import read_live

    function, sep, rest = spec.partition(":")
    old_name, sep2, new_name = rest.partition(":")
    if not (sep and sep2 and function and old_name and new_name):
        raise UsageError(f"--retarget {spec!r} is not FUNC:OLD:NEW", hint="e.g. --retarget 'main:malloc:my_malloc'")
    obj, image = mapped_object(pid, path=lib)
    new_target = resolve_target(obj, image, new_name)
    scan = scan_sites(image, kinds={SiteKind.CALL, SiteKind.JMP}, functions=[function], calls_to=[old_name],
                      base=obj.base)
    if scan.functions_scanned == 0:
        if not image.local_names:
            raise _stripped(obj, f"no function matches {function!r}")
        raise SymbolNotFound(f"no function of {obj.path} matches {function!r}", hint=_sites_hint(obj))
    live = read_live(pid, [s.address for s in scan.sites])
    planned = []
    _refuse_ours(pid, [site.address for site in scan.sites])
    for site in scan.sites:
        # The file says where the site went; it counts only if it still goes there.
        if _target_of(site.address, live[site.address]) != site.target:
            continue
        encode = encode_call if site.kind is SiteKind.CALL else encode_jmp
        planned.append(Planned(site.address, site.location, live[site.address], encode(site.address, new_target)))
    if not planned:
        changed = f" ({len(scan.sites)} changed already)" if scan.sites else ""
        raise SiteError(f"no call or jmp to {old_name} in functions matching {function!r}{changed}",
                        hint=f"list them with `textpoke sites {pid} -f '{function}' --calls-to '{old_name}'`")
    return planned


def _target_of(address: int, insn: bytes) -> int | None:
    try:
        return decode_site(address, insn).target
    except SiteError:
        return None


def _describe(insn: bytes, address: int) -> str:
    try:
        decoded = decode_site(address, insn)
    except SiteError:
        return insn.hex(" ")
    target = f" {decoded.target:#x}" if decoded.target is not None else ""
    return f"{decoded.kind.value}{target} ({insn.hex(' ')})"


def _line(item: Planned, *, writes: bool, dry_run: bool) -> str:
    """What happens to one site, in the same words for the real run and the dry run."""
    where = f"{item.address:#x} ({item.label})"
    if not writes:
        return f"unchanged {where}: holds {_describe(item.old, item.address)} already"
    verb = "would patch" if dry_run else "patched"
    return f"{verb} {where}: {_describe(item.old, item.address)} -> {_describe(item.new, item.address)}"


def _revert_plan(planned: list[Planned], original: Callable[[int], bytes | None],
                 current: Callable[[int], bytes]) -> list[Planned]:
    """--revert: each site's original bytes (from the target's ledger)."""
    result = []
    for item in planned:
        before = original(item.address)
        if before is None:
            raise SiteError(f"{item.address:#x} ({item.label}) was never changed by textpoke; nothing was written",
                            hint="--revert only undoes textpoke's own changes")
        result.append(Planned(item.address, item.label, current(item.address), before))
    return result


def _session_holder(region_inode: int) -> int | None:
    """The pid holding the session lock (a flock on the resident region's memfd,
    inode ``region_inode``) as /proc/locks shows it; None if nobody holds it.
    Read, not tried: a dry run must not make a real session fail meanwhile."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:01:5678 0 EOF" (blocked waiters are "->" lines)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(region_inode):
            return int(fields[4])
    return None


def _dry_run(pid: int, planned: list[Planned], *, revert: bool) -> list[Planned]:
    """What the real run would do, found without writing, installing or locking anything:
    the refusals of attach's first step (a stopped process, another tracer when a
    first attach would have to borrow a thread), another session holding the process
    (BusyError), and the ledger read from the target (for --revert). Threads that
    block SIGTRAP are no reason to refuse: the real run holds them through its batch."""
    from ..poke.recover import inspect

    with Process(pid) as process:
        if process.stopped():
            raise TargetStopped(f"process {pid} is stopped (SIGSTOP or a debugger); textpoke needs it running")
        region, states = inspect(process)
    if region is None:
        refuse_foreign_tracer(pid)  # the real run installs: it borrows a thread with ptrace
    else:
        holder = _session_holder(region.inode)
        if holder is not None:
            raise BusyError(f"another textpoke session (pid {holder}) is attached to process {pid}; "
                            "the real run would be refused")
    if revert:
        by_site = {state.site: state for state in states}
        planned = _revert_plan(
            planned,
            original=lambda site: by_site[site].original if site in by_site else None,
            current=lambda site: by_site[site].effective,
        )
    return planned


@click.command("patch")
@click.option("-p", "--pid", type=int, required=True, help="The running process.")
@click.option("--site", "sites", multiple=True, metavar="ADDR|FUNC+OFF|FUNC",
              help="A site: an address, function+offset, or a function name/glob (its fentry nop5). Repeatable.")
@click.option("--call", "call_to", metavar="TARGET", help="Make the sites `call TARGET` (an address or a function).")
@click.option("--jmp", "jmp_to", metavar="TARGET", help="Make the sites `jmp TARGET`.")
@click.option("--nop", is_flag=True, help="Make the sites nop5.")
@click.option("--revert", is_flag=True, help="Put the sites back to their bytes before textpoke changed them.")
@click.option("--retarget", metavar="FUNC:OLD:NEW", help="Every call/jmp to OLD in functions matching FUNC goes to NEW.")
@click.option("--expect", metavar="HEX", help="Refuse unless each site holds these 5 bytes now.")
@click.option("--lib", metavar="PATH_OR_NAME", help="Sites and names in this mapped library, not the executable.")
@click.option("--dry-run", is_flag=True, help="Check everything and print what would change; write nothing.")
def command(pid: int, sites: tuple[str, ...], call_to: str | None, jmp_to: str | None, nop: bool, revert: bool,
            retarget: str | None, expect: str | None, lib: str | None, dry_run: bool) -> None:
    """Patch sites of a running process; the change stays after textpoke detaches."""
    actions = [name for name, given in (("--call", call_to), ("--jmp", jmp_to), ("--nop", nop),
                                        ("--revert", revert), ("--retarget", retarget)) if given]
    if len(actions) != 1:
        raise UsageError("give exactly one of --call, --jmp, --nop, --revert, --retarget"
                         + (f" (got {', '.join(actions)})" if actions else ""), hint=_HELP)
    if retarget is not None and sites:
        raise UsageError("--retarget finds its own sites; drop --site", hint=_HELP)
    if retarget is None and not sites:
        raise UsageError("give the sites to patch with --site", hint=_HELP)
    expected = _parse_expect(expect)
    with target_errors(pid):
        _patch(pid, sites=sites, call_to=call_to, jmp_to=jmp_to, nop=nop, revert=revert, retarget=retarget,
               expected=expected, lib=lib, dry_run=dry_run)


def _patch(pid: int, *, sites: tuple[str, ...], call_to: str | None, jmp_to: str | None, nop: bool, revert: bool,
           retarget: str | None, expected: bytes | None, lib: str | None, dry_run: bool) -> None:
    from ..poke.protocol import Patch
    from ..poke.session import attach
    from ..sites import mapped_object

    _check_process(pid)
    if retarget is not None:
        planned = _retarget_plan(pid, retarget, lib)
    else:
        obj, image = mapped_object(pid, path=lib)
        if call_to is not None or jmp_to is not None:
            target = resolve_target(obj, image, call_to if call_to is not None else jmp_to)  # type: ignore[arg-type]
            encode = encode_call if call_to is not None else encode_jmp

            def new_for(address: int, old: bytes) -> bytes:
                return encode(address, target)
        else:
            def new_for(address: int, old: bytes) -> bytes:
                return NOP5 if nop else old  # --revert: decided from the ledger below
        planned = plan(pid, obj, image, specs=sites, expect=expected, new_for=new_for)

    if dry_run:
        planned = _dry_run(pid, planned, revert=revert)
        for item in planned:
            click.echo(_line(item, writes=not item.unchanged, dry_run=True))
        writes = sum(not item.unchanged for item in planned)
        click.echo(f"dry run: {writes} of {_plural(len(planned), 'site')} would be written in one batch; "
                   "nothing was written")
        return

    session = attach(pid)
    try:
        if session.recovery is not None and session.recovery.written:
            click.echo(f"textpoke: note: put back {_plural(len(session.recovery.written), 'site')} a killed "
                       "textpoke had left changed", err=True)
        if revert:
            planned = _revert_plan(planned, original=session.resident.ledger.original, current=session.read_insn)
        batch = [Patch(site=item.address, old=item.old, new=item.new) for item in planned]
        result = session.apply(batch)
    finally:
        session.close(revert=False)  # commit: the change stays
    done = set(result.patched)
    for item in planned:
        click.echo(_line(item, writes=item.address in done, dry_run=False))
    click.echo(f"{len(done)} of {_plural(len(planned), 'site')} written in one batch ({result.syncs} syncs); "
               f"`textpoke recover -p {pid}` puts back the original bytes")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


__all__ = ["Planned", "command", "plan", "resolve_function", "resolve_sites", "resolve_target"]
