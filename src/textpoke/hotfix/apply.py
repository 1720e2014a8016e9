"""Hot-fixing a running process: plan, load, redirect, record; revert; list.

A fix replaces functions of the target's main executable by functions of a
loaded object (hotfix/loader.py). Each replaced function is redirected

- at its fentry site, when the binary has one (``nop5`` -> ``jmp new``): every
  call, from anywhere, function pointers included, runs the new code;
- otherwise at every ``call old`` / ``jmp old`` site of the main executable
  (``call new``): calls through pointers, from other objects, and from objects
  loaded later are not caught (:attr:`Redirect.uncaught` says so).

One batch (Session.apply: every site old or new, never neither) switches all of
a fix's sites; threads already inside an old function finish it there.

Crash order (the tool may die at any instant; poke/fixes.py has the ledger):

1. everything is checked and linked before anything is written (:func:`prepare_fix`);
2. the image is written whole into its new region (the target sees it at once:
   shared memory) before any site can lead there; the batch's syncs order it
   before the first jmp for every core;
3. the fix's record is appended, state OUT;
4. the batch (killed here: the agent heals it, and the next attach takes the
   sites back to their baselines: not fixed at all);
5. the record's state word becomes IN: the commit point (killed after it: the
   next attach commits the new bytes as baselines: fully fixed);
6. the sites' baselines are committed (Session.keep).

Reverting: state OUT first (the commit point), then the batch back, then the
baselines. The loaded code stays mapped (a thread may still be in it) and its
record stays: applying the same fix again reuses both (no new mapping), after
checking that the code in the target is byte for byte what a fresh link gives.

Not handled: a fix that replaces a function another fix in force replaces
(revert that one first); a fork child keeps its parent's fixes in its text but
does not list them (its resident part is its own, the ledger its parent's).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._errors import FixRefused, SiteError, SymbolNotFound, UsageError
from ..poke.bulk import PatchArray, insn_rows
from ..poke.fixes import IN, OUT, FixLedger, FixRecord
from ..poke.protocol import BatchResult
from ..poke.resident import FIX_CODE_NAME
from ..poke.session import Session
from ..target.maps import DEFAULT_REACH, read_maps
from ..target.process import Process
from ..target.security import check_architecture, ours
from ..x86.insn import CALL_OPCODE, NOP5, SITE_SIZE, encode_call, encode_jmp
from .loader import FixFile, Image, Layout, TargetSymbols, build, layout, link, read_fix

REGION_NAME = FIX_CODE_NAME
FENTRY, CALLS = "fentry", "calls"


@dataclass(frozen=True)
class Redirect:
    """One function of the target replaced by one of the fix."""

    old: str  # the target's function
    new: str  # the fix's function
    old_address: int
    kind: str  # FENTRY (its nop5) or CALLS (every call/jmp site of the main executable)
    sites: tuple[int, ...]
    old_insns: tuple[bytes, ...]  # what the program's file has there: what a revert puts back
    live: tuple[bytes, ...] = ()  # what the sites held when the fix was prepared

    @property
    def uncaught(self) -> str:
        """What this redirect cannot catch (empty for a fentry redirect)."""
        if self.kind == FENTRY:
            return ""
        return (f"{self.old} has no fentry site: {len(self.sites)} call/jmp site(s) of the program retargeted; "
                "calls through function pointers, from libraries and from objects loaded later still run the old code")


@dataclass(frozen=True)
class PreparedFix:
    """A fix checked and linked against a process, nothing written yet."""

    pid: int
    name: str
    fix: FixFile
    layout: Layout
    redirects: tuple[Redirect, ...]
    target: TargetSymbols


@dataclass(frozen=True)
class AppliedFix:
    """What :func:`hotfix` did."""

    name: str
    record: int  # the fix's id in the target's ledger
    image: int  # where its code is
    image_size: int
    functions: dict[str, int]  # the fix's functions -> their addresses in the target
    fentry_sites: tuple[int, ...]  # the fix's own fentry sites (traceable)
    redirects: tuple[Redirect, ...]
    result: BatchResult | None  # None: it was in force already
    reused: bool  # the image of an earlier application was reused (nothing mapped)


@dataclass(frozen=True)
class FixInfo:
    """A fix as the target's ledger holds it (:func:`list_fixes`)."""

    id: int
    name: str
    in_force: bool
    image: int
    image_size: int
    functions: dict[str, list]  # old -> [new, new address, kind, sites]
    source: str


def _parse_replace(replace: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    if replace is None:
        return {}
    if isinstance(replace, Mapping):
        return dict(replace)
    pairs = {}
    for spec in replace:
        old, sep, new = spec.partition("=")
        if not (sep and old and new):
            raise UsageError(f"--replace {spec!r} is not OLD=NEW", hint="e.g. --replace compute=compute_fixed")
        pairs[old] = new
    return pairs


def prepare_fix(pid: int, source: str | os.PathLike[str], *, replace: Mapping[str, str] | Sequence[str] | None = None,
                name: str | None = None, cflags: Sequence[str] = ()) -> PreparedFix:
    """Build (for ``.c``), read and link a fix against process ``pid``, writing nothing.

    Steps: the process is checked (exists, x86-64); ``fix.c`` is compiled
    (loader.FIX_CFLAGS); the object is read (refusals: not x86-64, TLS,
    constructors, relocation types); the replacements are found (``replace``
    OLD=NEW pairs, else every global function of the fix by its own name: each
    must be a function of the target's executable); each one's sites are found
    (fentry nop5, else its call/jmp sites) and checked live; then the fix is
    linked at a trial address near the sites, so unresolved symbols and
    relocations that cannot be applied are refused here."""
    with Process(pid):
        pass
    check_architecture(pid)
    source = os.fspath(source)
    if source.endswith(".c"):
        with tempfile.TemporaryDirectory(prefix="textpoke-fix-") as workdir:
            fix = read_fix(build(source, cflags=cflags, workdir=workdir), shown=source)
    else:
        fix = read_fix(source)
    path = Path(source)
    label = name or Path(source).stem
    if len(label.encode()) > 64 or not label or any(c in label for c in "\n\0"):
        raise UsageError(f"fix name {label!r} must be 1 to 64 bytes on one line", hint="give --name")
    pairs = _parse_replace(replace)
    defined = fix.defined_functions()
    if not pairs:
        pairs = {fn: fn for fn in defined}
        if not pairs:
            raise FixRefused(f"{os.path.basename(path)} defines no global function: nothing to replace",
                             hint="define the fixed function with the name of the one it replaces, or --replace")
    for old, new in pairs.items():
        if new not in defined:
            raise SymbolNotFound(f"{os.path.basename(path)} defines no global function {new} (--replace {old}={new})")
    target = TargetSymbols(pid)
    addresses = {}
    for old in pairs:
        address = target.function(old)
        if address is None:
            raise SymbolNotFound(f"function {old} (defined by the fix) does not exist in {target.exe_path}; "
                                 "nothing was written",
                                 hint="make helpers of the fix static, or name what it replaces with --replace OLD=NEW")
        addresses[old] = address
    redirects = _find_sites(pid, pairs, addresses)
    where = layout(fix)
    process = Process(pid)
    try:
        trial = (min(r.old_address for r in redirects) & ~0xFFF) + 0x1000_0000  # near the sites: rel32 holds
        link(fix, where, trial, target=target, read=lambda addr: _read_u64(process, addr))
    finally:
        process.close()
    return PreparedFix(pid, label, fix, where, tuple(redirects), target)


def _read_u64(process: Process, address: int) -> int:
    return struct.unpack("<Q", process.read(address, 8))[0]


def _find_sites(pid: int, pairs: Mapping[str, str], addresses: Mapping[str, int]) -> list[Redirect]:
    """The sites that redirect each replaced function: its fentry nop5, else every
    call/jmp to it in the main executable (one scan for all the fentry sites, one
    for all the call sites)."""
    from ..sites import SiteKind, mapped_object, scan_sites
    from ..sites.process import read_live

    obj, image = mapped_object(pid)
    scan = scan_sites(image, kinds={SiteKind.FENTRY}, functions=list(pairs), base=obj.base)
    entries = sorted(site.address for site in scan.sites)
    fentry: dict[str, int] = {}
    for old, address in addresses.items():
        at = bisect.bisect_left(entries, address)
        if at < len(entries) and entries[at] < address + 16:  # the first instruction, or after endbr64
            fentry[old] = entries[at]
    live = read_live(pid, list(fentry.values())) if fentry else {}
    redirects = {old: Redirect(old, pairs[old], addresses[old], FENTRY, (site,), (NOP5,), (live[site],))
                 for old, site in fentry.items()}
    rest = [old for old in pairs if old not in fentry]
    if rest:
        scan = scan_sites(image, kinds={SiteKind.CALL, SiteKind.JMP}, calls_to=rest, base=obj.base)
        by_target: dict[int, list] = {}
        for site in scan.sites:
            by_target.setdefault(site.target, []).append(site)
        for old in rest:
            sites = by_target.get(addresses[old], [])
            if not sites:
                raise SiteError(f"{old} has no fentry site and no call or jmp site of {obj.path} calls it; "
                                "nothing was written",
                                hint="build the program with -pg -mfentry -mnop-mcount -mrecord-mcount (fentry sites)")
            now = read_live(pid, [s.address for s in sites])
            redirects[old] = Redirect(old, pairs[old], addresses[old], CALLS, tuple(s.address for s in sites),
                                      tuple(s.insn for s in sites), tuple(now[s.address] for s in sites))
    return [redirects[old] for old in pairs]


def _check_live(pid: int, redirects: Sequence[Redirect]) -> None:
    """Every site holds what the program's file has there (no fix, no tracer on it)."""
    for r in redirects:
        for site, old, live in zip(r.sites, r.old_insns, r.live):
            if live != old:
                what = "fentry site" if r.kind == FENTRY else "call site"
                raise SiteError(f"the {what} {site:#x} of {r.old} holds {live.hex(' ')}, not the program's "
                                f"{old.hex(' ')}: a tracer or another tool holds it; nothing was written",
                                hint=f"see `textpoke hotfix -p {pid} --list`; end that session or recover first")


def _new_insn(site: int, old: bytes, kind: str, target: int) -> bytes:
    if kind == FENTRY:
        return encode_jmp(site, target)
    encode = encode_call if old[0] == CALL_OPCODE else encode_jmp
    return encode(site, target)


def _info(record: FixRecord) -> FixInfo:
    meta = record.meta
    return FixInfo(record.id, meta.get("name", f"#{record.id}"), record.in_force, meta.get("image", 0),
                   meta.get("image_size", 0), meta.get("functions", {}), meta.get("source", ""))


def list_fixes(session: Session) -> list[FixInfo]:
    """The fixes the target's ledger holds, in force or reverted, oldest first."""
    fixes = FixLedger.find(session.resident)
    return [] if fixes is None else [_info(r) for r in fixes.records()]


def _mapped_image(pid: int, address: int, size: int) -> bool:
    """Our region is still mapped at ``address`` with at least ``size`` bytes."""
    mine = ours(read_maps(pid))
    return any(m.start == address for m in mine) and \
        sum(m.end - m.start for m in mine if address <= m.start < address + size) == size


def hotfix(session: Session, source: str | os.PathLike[str] | PreparedFix, *,
           replace: Mapping[str, str] | Sequence[str] | None = None, name: str | None = None,
           cflags: Sequence[str] = (), on_step: Callable[[str], None] | None = None) -> AppliedFix:
    """Load a fix into the session's process and redirect the functions it replaces
    (steps and crash order: the module docstring). The change stays after the
    session ends, whether it reverts or not (its sites are :meth:`Session.keep` s).
    ``on_step`` is called after each step: "loaded" (image written), "recorded",
    each batch Step's value, "committed" (the state word), "kept" (baselines)."""
    prepared = source if isinstance(source, PreparedFix) else prepare_fix(
        session.pid, source, replace=replace, name=name, cflags=cflags)
    resident = session.resident
    process = session.process
    fixes = FixLedger.create(resident)
    records = fixes.records()
    all_sites = [site for r in prepared.redirects for site in r.sites]
    # Another fix in force on one of these sites: refused (its revert first).
    for record in records:
        if record.in_force and set(record.sites) & set(all_sites):
            same = record.meta.get("digest") == prepared.fix.digest and record.meta.get("name") == prepared.name
            if same:
                info = _info(record)
                return AppliedFix(info.name, record.id, info.image, info.image_size,
                                  record.meta.get("fix_functions", {}), tuple(record.meta.get("fentry_sites", ())),
                                  prepared.redirects, None, True)
            raise SiteError(f"{_names(prepared.redirects)} is replaced by fix {record.meta.get('name')!r} already; "
                            "nothing was written",
                            hint=f"revert it first: textpoke hotfix -p {session.pid} --revert {record.meta.get('name')}")
    _check_live(session.pid, [dataclasses.replace(r, live=tuple(process.read(site, SITE_SIZE) for site in r.sites))
                              for r in prepared.redirects])
    read = lambda addr: _read_u64(process, addr)  # noqa: E731
    where = prepared.layout
    size = where.code_size + where.data_size
    # The same fix applied before (reverted since): its image, if the target still has it unchanged.
    for record in reversed(records):
        meta = record.meta
        if meta.get("digest") != prepared.fix.digest or meta.get("name") != prepared.name:
            continue
        if meta.get("image_size") != size or not _mapped_image(session.pid, meta["image"], size):
            continue
        image = link(prepared.fix, where, meta["image"], target=prepared.target, read=read)
        if process.read(image.address, len(image.code)) != image.code:
            continue
        patches = _patches(prepared, image)
        if tuple(record.sites) != tuple(int(s) for s in patches.sites) or \
                tuple(record.new) != tuple(bytes(row) for row in patches.new):
            continue
        result = _switch(session, fixes, record, patches, IN, on_step=on_step)
        return _applied(prepared, record, image, result, reused=True)
    near = min(r.old_address for r in prepared.redirects)
    # Private: its fentry sites can then be patched through /proc/PID/mem (traced).
    region = resident.map_shared(code_size=where.code_size, data_size=where.data_size, near=near, name=REGION_NAME,
                                 private=True)
    image = link(prepared.fix, where, region.address, target=prepared.target, read=read)
    for site in all_sites:
        if abs(image.address - site) > DEFAULT_REACH or abs(image.address + size - site) > DEFAULT_REACH:
            raise FixRefused(f"the fix's code at {image.address:#x} is out of rel32 reach of site {site:#x}; "
                             "no site was written")
    # The whole image before any site can lead there (crash order step 2).
    resident.write_code(region, image.code)
    region.local[where.code_size : where.code_size + len(image.data)] = image.data
    _step(on_step, "loaded")
    patches = _patches(prepared, image)
    meta = {
        "name": prepared.name, "digest": prepared.fix.digest, "source": str(prepared.fix.path),
        "image": image.address, "image_size": size, "fentry_sites": list(image.fentry_sites),
        "fix_functions": image.functions,
        "functions": {r.old: [r.new, image.functions[r.new], r.kind, len(r.sites)] for r in prepared.redirects},
    }
    record = fixes.append(sites=[int(s) for s in patches.sites], old=[bytes(row) for row in patches.old],
                          new=[bytes(row) for row in patches.new], meta=meta)
    _step(on_step, "recorded")
    result = _switch(session, fixes, record, patches, IN, on_step=on_step)
    return _applied(prepared, record, image, result, reused=False)


def _names(redirects: Sequence[Redirect]) -> str:
    return ", ".join(r.old for r in redirects)


def _patches(prepared: PreparedFix, image: Image) -> PatchArray:
    sites, old, new = [], [], []
    for r in prepared.redirects:
        target = image.functions[r.new]
        for site, insn in zip(r.sites, r.old_insns):
            sites.append(site)
            old.append(insn)
            new.append(_new_insn(site, insn, r.kind, target))
    order = np.argsort(np.asarray(sites, dtype=np.uint64), kind="stable")
    return PatchArray(np.asarray(sites, dtype=np.uint64)[order], insn_rows(old)[order], insn_rows(new)[order])


def _step(on_step: Callable[[str], None] | None, name: str) -> None:
    if on_step is not None:
        on_step(name)


def _switch(session: Session, fixes: FixLedger, record: FixRecord, patches: PatchArray, state: int, *,
            on_step: Callable[[str], None] | None = None) -> BatchResult:
    """One batch and the record's state word, in the crash order of the module doc:
    IN after the batch, OUT before it; then the sites' baselines."""
    if state == OUT:
        fixes.set_state(record, OUT)
        _step(on_step, "committed")
    result = session.apply(patches, on_step=None if on_step is None else lambda step: on_step(step.value))
    if state == IN:
        fixes.set_state(record, IN)
        _step(on_step, "committed")
    session.keep(int(s) for s in patches.sites)
    _step(on_step, "kept")
    return result


def _applied(prepared: PreparedFix, record: FixRecord, image: Image, result: BatchResult, *,
             reused: bool) -> AppliedFix:
    return AppliedFix(prepared.name, record.id, image.address, image.size, image.functions, image.fentry_sites,
                      prepared.redirects, result, reused)


def revert_fix(session: Session, name: str | None = None, *,
               on_step: Callable[[str], None] | None = None) -> list[FixInfo]:
    """Put back the old functions of fix ``name`` (None: every fix in force), one
    batch per fix; the loaded code stays mapped. Returns the fixes reverted.
    ``on_step``: as :func:`hotfix`'s ("committed" comes first here: the state word)."""
    fixes = FixLedger.find(session.resident)
    records = [] if fixes is None else fixes.records()
    chosen = [r for r in records if r.in_force and (name is None or r.meta.get("name") == name)]
    if name is not None and not chosen:
        known = sorted({str(r.meta.get("name")) for r in records if r.in_force})
        raise SymbolNotFound(f"no fix named {name!r} is in force in process {session.pid}",
                             hint=f"fixes in force: {', '.join(known)}" if known else "no fix is in force")
    done = []
    for record in reversed(chosen):
        assert fixes is not None
        patches = PatchArray(np.asarray(record.sites, dtype=np.uint64), insn_rows(record.new), insn_rows(record.old))
        _switch(session, fixes, record, patches, OUT, on_step=on_step)
        done.append(_info(record))
    return done


__all__ = ["AppliedFix", "FixInfo", "PreparedFix", "Redirect", "hotfix", "list_fixes", "prepare_fix", "revert_fix"]
