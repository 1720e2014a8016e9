"""``textpoke patch``: change one or more sites of a running process, and leave them changed.

Everything is checked before anything is written or installed (a refusal
leaves the process exactly as it was): the pid (exists, a live user-space
x86-64 process we may trace), the names (functions, globs), each address (not
in textpoke's own mappings, an instruction start, a single 5-byte
nop5/call/jmp, holding ``--expect``), and the new instruction's target
(executable code). Then one batch writes every site (3 syncs) and the change is
committed: it stays after textpoke detaches, and a later attach keeps it;
``textpoke patch --revert`` or ``textpoke recover`` puts the original bytes back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import click

from .._errors import OwnCodeRefused, SiteError, SymbolNotFound, UsageError
from ..poke.protocol import Patch
from ..poke.session import Session, attach
from ..sites import SiteKind, check_site, mapped_object, scan_sites
from ..sites.elf import ElfImage
from ..sites.process import MappedObject, read_live
from ..target.maps import read_maps
from ..target.process import Process
from ..target.security import check_architecture, ours
from ..x86.insn import NOP5, SITE_SIZE, decode_site, encode_call, encode_jmp

#: FUNC+OFF: OFF is hex with 0x (as objdump prints it) or decimal.
_OFFSET_SPEC = re.compile(r"^(?P<name>[^+]+)\+(?P<offset>0[xX][0-9a-fA-F]+|[0-9]+)$")
_GLOB_CHARS = set("*?[")
_HELP = "see `textpoke patch --help`"


@dataclass(frozen=True)
class Planned:
    """One site of the command line, checked, with its new bytes."""

    address: int
    label: str  # function+offset
    old: bytes
    new: bytes


def _int(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None


def _functions_by_name(image: ElfImage) -> dict[str, int]:
    return {name: fn.address for fn in image.functions for name in fn.names}


def _stripped(obj: MappedObject, what: str) -> SymbolNotFound:
    return SymbolNotFound(
        f"{what}: {obj.path} is stripped (no symbol table): only its exported functions have names, "
        "the others are sub_<address> (from .eh_frame)",
        hint=f"list them with `textpoke sites {obj.pid} --kind call`, or install the program's debug symbols",
    )


def resolve_function(obj: MappedObject, image: ElfImage, name: str) -> int:
    """Runtime address of function ``name`` of the object."""
    address = _functions_by_name(image).get(name)
    if address is None:
        if not image.local_names:
            raise _stripped(obj, f"function {name} not found")
        raise SymbolNotFound(f"function {name} not found in {obj.path}")
    return address + obj.base


def resolve_sites(obj: MappedObject, image: ElfImage, spec: str) -> list[int]:
    """Addresses named by one ``--site``: ADDR, FUNC+OFF, or FUNC/GLOB (fentry sites)."""
    address = _int(spec)
    if address is not None:
        if not image.local_names and image.function_at(address - obj.base) is None:
            raise _stripped(obj, f"cannot check {address:#x}, which is in no function known")
        return [address]
    match = _OFFSET_SPEC.match(spec)
    if match:
        return [resolve_function(obj, image, match["name"]) + int(match["offset"], 0)]
    scan = scan_sites(image, kinds={SiteKind.FENTRY}, functions=[spec], base=obj.base)
    if scan.functions_scanned == 0:
        if not image.local_names:
            raise _stripped(obj, f"no function matches {spec!r}")
        if _GLOB_CHARS & set(spec):
            raise SymbolNotFound(f"no function of {obj.path} matches {spec!r}")
        raise SymbolNotFound(f"function {spec} not found in {obj.path}")
    if not scan.sites:
        raise SiteError(
            f"{scan.functions_scanned} function(s) match {spec!r} but none has an fentry nop5 site",
            hint="give FUNC+OFFSET or an address of a call/jmp site, or build with -pg -mfentry -mnop-mcount",
        )
    return [site.address for site in scan.sites]


def resolve_target(obj: MappedObject, image: ElfImage, spec: str) -> int:
    address = _int(spec)
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
        raise SymbolNotFound(f"no function of {obj.path} matches {function!r}")
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
@click.option("--dry-run", is_flag=True, help="Check and print what would change; write nothing.")
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
                return NOP5 if nop else old  # --revert: decided under the session lock
        planned = plan(pid, obj, image, specs=sites, expect=expected, new_for=new_for)

    if dry_run:
        for item in planned:
            goal = "its original bytes" if revert else _describe(item.new, item.address)
            click.echo(f"would patch {item.address:#x} ({item.label}): {_describe(item.old, item.address)} -> {goal}")
        return

    session = attach(pid)
    try:
        if session.recovery is not None and session.recovery.written:
            click.echo(f"textpoke: note: put back {len(session.recovery.written)} sites a killed textpoke "
                       "had left changed", err=True)
        if revert:
            planned = _revert_plan(session, planned)
        batch = [Patch(site=item.address, old=item.old, new=item.new) for item in planned]
        result = session.apply(batch)
    finally:
        session.close(revert=False)  # commit: the change stays
    done = set(result.patched)
    for item in planned:
        verb = "patched" if item.address in done else "unchanged"
        click.echo(f"{verb} {item.address:#x} ({item.label}): {_describe(item.old, item.address)} -> "
                   f"{_describe(item.new, item.address)}")
    click.echo(f"{len(done)} of {len(planned)} sites written in one batch ({result.syncs} syncs); "
               f"`textpoke recover -p {pid}` puts back the original bytes")


def _revert_plan(session: Session, planned: list[Planned]) -> list[Planned]:
    """--revert: each site's original from the target's ledger."""
    result = []
    for item in planned:
        original = session.resident.ledger.original(item.address)
        if original is None:
            raise SiteError(f"{item.address:#x} ({item.label}) was never changed by textpoke; nothing was written",
                            hint="--revert only undoes textpoke's own changes")
        result.append(Planned(item.address, item.label, session.read_insn(item.address), original))
    return result
