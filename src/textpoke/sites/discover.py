"""Which 5-byte sites a binary has, found from its ELF tables and by decoding.

A site is a single 5-byte instruction at an instruction boundary:

- **fentry**: what gcc puts at a function's entry for ``-pg -mfentry``:
  ``nop5`` with ``-mnop-mcount``, else ``call __fentry__`` (a 5-byte
  ``call rel32``, non-PIE builds), recorded in ``__mcount_loc`` with
  ``-mrecord-mcount``; without that section, such an instruction that is the
  function's first (after ``endbr64``) qualifies.  A fentry site is patched
  like a nop5 (its original, put back afterwards, is that nop5 or call).
  Refused, one reason each: the 6-byte ``call *__fentry__@GOTPCREL(%rip)`` of
  PIE builds (textpoke rewrites 5-byte instructions) and the 1-byte nops of
  ``-fpatchable-function-entry`` (five instructions: a thread may have run
  the first ones and stand between them, so no 5-byte instruction may
  replace them).
- **call** / **jmp**: every ``call rel32`` / ``jmp rel32`` met when decoding a
  function from its start to its end with iced-x86 (functions and bounds
  from :mod:`.elf`: symbols, or ``.eh_frame`` in a stripped binary).  Only
  what the decoder reached from a function start counts, so a site is always
  a real instruction start, never bytes inside another instruction, and no
  byte outside a known function is ever decoded.  With ``calls_to``, a numpy
  pass over the code first finds the functions holding an ``e8``/``e9`` byte
  whose rel32 reaches a wanted callee, and only those are decoded.

Results are columns (numpy arrays, :class:`SiteColumns`); :class:`Site`
objects are made only for what a caller asks for (``SiteScan.sites``).
Addresses are link-time addresses plus ``base`` (the load bias of a mapped copy).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence

import numpy as np
from iced_x86 import Code, Decoder, Instruction

from ..x86.insn import CALL_OPCODE, CALL_RIP_INDIRECT, CALL_SIZE, ENDBR64, JMP_OPCODE, NOP1_BYTE, NOP5
from ._arrays import unique
from .elf import ElfImage, FunctionTable, open_elf
from .functions import search
from .names import compile_glob, compile_globs, is_glob
from .site import (
    _KIND_CODE,
    _R_CALL,
    _R_ENTRY,
    _R_FCALL,
    _R_FCALL_ENTRY,
    _R_JMP,
    _R_MCOUNT,
    _R_PATCHABLE,
    DEFAULT_KINDS,
    FENTRY_SYMBOL,
    KINDS,
    REASON_CALL,
    REASON_ENTRY,
    REASON_FENTRY_CALL,
    REASON_FENTRY_CALL_ENTRY,
    REASON_JMP,
    REASON_MCOUNT,
    REASON_PATCHABLE,
    REASONS,
    REFUSED_GOT_CALL,
    REFUSED_NO_FUNCTION,
    REFUSED_NOT_BOUNDARY,
    REFUSED_ONE_BYTE_NOPS,
    Query,
    Site,
    SiteColumns,
    SiteKind,
    SiteScan,
    branch_target,
    materialize,
)


_ENDBR64 = ENDBR64
_GOT_CALL = CALL_RIP_INDIRECT
_ONE_BYTE_NOPS = bytes([NOP1_BYTE]) * CALL_SIZE



# -- helpers ------------------------------------------------------------------


def _image(path_or_elf: str | os.PathLike[str] | ElfImage) -> ElfImage:
    return path_or_elf if isinstance(path_or_elf, ElfImage) else open_elf(path_or_elf)


def gather(image: ElfImage, addresses: np.ndarray, size: int = CALL_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``size`` file bytes at each link-time address: ``(bytes (n, size), readable mask)``."""
    addresses = np.asarray(addresses, dtype=np.uint64)
    out = np.zeros((len(addresses), size), dtype=np.uint8)
    ok = np.zeros(len(addresses), dtype=bool)
    for section in image.code:
        inside = (addresses >= section.address) & (addresses + size <= section.end) & ~ok
        if not inside.any():
            continue
        data = np.frombuffer(section.data, dtype=np.uint8)
        offsets = (addresses[inside] - section.address).astype(np.int64)
        out[inside] = data[offsets[:, None] + np.arange(size)]
        ok |= inside
    return out, ok


def _rel32_targets(address: np.ndarray, insn: np.ndarray) -> np.ndarray:
    """Targets of rel32 branches (uint64; int64 arithmetic wraps like the CPU's)."""
    disp = insn[:, 1:5].copy().view("<i4").reshape(-1).astype(np.int64)
    return (address.astype(np.int64) + CALL_SIZE + disp).astype(np.uint64)


def _entry_boundary(image: ElfImage, start: int, address: int) -> bool:
    """Whether decoding from ``start`` lands exactly on ``address``."""
    data = image.read(start, address - start + CALL_SIZE)
    if data is None:
        return False
    decoder = Decoder(64, data, ip=start)
    instr = Instruction()
    while decoder.can_decode and decoder.ip < address:
        decoder.decode_out(instr)
        if instr.code == Code.INVALID:
            return False
    return decoder.ip == address


def _entry_after_endbr(image: ElfImage, start: int, end: int) -> int | None:
    """Address of a function's first instruction, skipping an ``endbr64``
    (-fcf-protection builds put the fentry instruction after it)."""
    data = image.read(start, min(end - start, len(_ENDBR64)))
    if not data:
        return None
    return start + len(_ENDBR64) if data == _ENDBR64 else start


def fentry_targets(image: ElfImage) -> np.ndarray:
    """Link-time addresses a fentry ``call`` may go to: ``__fentry__@plt`` or ``__fentry__`` itself."""
    found = [stub for stub, name in image.plt.items() if name == f"{FENTRY_SYMBOL}@plt"]
    table = image.table
    found += [int(table.starts[i]) for i in table.select([FENTRY_SYMBOL]).tolist()]
    return np.asarray(sorted(found), dtype=np.uint64)


def _got_fentry(image: ElfImage, address: int) -> bool:
    """Whether ``address`` holds ``call *[rip+disp32]`` through the GOT slot of ``__fentry__``."""
    data = image.read(address, 6)
    if data is None or not data.startswith(_GOT_CALL):
        return False
    disp = int.from_bytes(data[2:6], "little", signed=True)
    return image.got_names.get(address + 6 + disp) == FENTRY_SYMBOL


# -- fentry -------------------------------------------------------------------


def _fentry(image: ElfImage, selected: np.ndarray | None, base: int
            ) -> tuple[SiteColumns, list[tuple[int, str]]]:
    """fentry sites of the ``selected`` functions (None: all)."""
    table = image.table
    refused: list[tuple[int, str]] = []
    mcount, patchable = image.mcount, image.patchable
    recorded = np.concatenate([mcount, patchable])
    reason = np.concatenate([np.full(len(mcount), _R_MCOUNT, np.uint8), np.full(len(patchable), _R_PATCHABLE, np.uint8)])
    if len(recorded):
        recorded, first = np.unique(recorded, return_index=True)  # mcount wins a tie (listed first)
        reason = reason[first]
    owners = table.indices_at(recorded)
    for address in recorded[owners < 0].tolist():
        refused.append((address, REFUSED_NO_FUNCTION))
    keep = owners >= 0
    if selected is not None:
        keep &= np.isin(owners, selected)
    recorded, reason, owners = recorded[keep], reason[keep], owners[keep]
    if not image.has_mcount_section:
        # No record: a function whose first instruction (after endbr64) is a fentry one.
        chosen = np.arange(len(table)) if selected is None else selected
        starts = table.starts[chosen]
        head, ok = gather(image, starts, len(_ENDBR64))
        endbr = ok & (head == np.frombuffer(_ENDBR64, np.uint8)).all(axis=1)
        entries = starts + np.where(endbr, len(_ENDBR64), 0).astype(np.uint64)
        inside = entries + CALL_SIZE <= table.ends[chosen]
        recorded = np.concatenate([recorded, entries[inside]])
        owners = np.concatenate([owners, chosen[inside]])
        reason = np.concatenate([reason, np.full(int(inside.sum()), _R_ENTRY, np.uint8)])
    insn, readable = gather(image, recorded)
    is_nop5 = (insn == np.frombuffer(NOP5, np.uint8)).all(axis=1)
    is_call = insn[:, 0] == CALL_OPCODE
    targets = np.where(is_call, _rel32_targets(recorded, insn), 0).astype(np.uint64)
    is_fentry_call = is_call & np.isin(targets, fentry_targets(image)) if is_call.any() else is_call
    good = readable & (is_nop5 | is_fentry_call)
    unrecorded = reason == _R_ENTRY
    for k in np.flatnonzero(~good & ~unrecorded).tolist():
        refused.append((int(recorded[k]), _refusal(image, int(recorded[k]), insn[k].tobytes(), bool(readable[k]))))
    good_idx = np.flatnonzero(good)
    starts = table.starts[owners[good_idx]]
    at = recorded[good_idx]
    at_start = at == starts
    after_endbr = at == starts + len(_ENDBR64)
    if after_endbr.any():
        head, ok = gather(image, starts[after_endbr], len(_ENDBR64))
        after_endbr[after_endbr] = ok & (head == np.frombuffer(_ENDBR64, np.uint8)).all(axis=1)
    boundary = at_start | after_endbr
    for k in np.flatnonzero(~boundary).tolist():
        # Rare: the recorded location is further in (e.g. after a patchable-entry prefix).
        boundary[k] = _entry_boundary(image, int(starts[k]), int(at[k]))
        if not boundary[k] and not unrecorded[good_idx[k]]:
            refused.append((int(at[k]), REFUSED_NOT_BOUNDARY))
    rows = good_idx[boundary]
    fcall = is_fentry_call[rows]
    row_reason = reason[rows].copy()
    row_reason[fcall & (row_reason == _R_ENTRY)] = _R_FCALL_ENTRY
    row_reason[fcall & (row_reason != _R_FCALL_ENTRY)] = _R_FCALL
    columns = SiteColumns(
        address=recorded[rows] + np.uint64(base),
        kind=np.full(len(rows), _KIND_CODE[SiteKind.FENTRY], np.uint8),
        insn=insn[rows],
        function=owners[rows],
        offset=recorded[rows] - table.starts[owners[rows]],
        target=np.where(fcall, targets[rows] + np.uint64(base), 0).astype(np.uint64),
        reason=row_reason,
    )
    return columns, refused


def _refusal(image: ElfImage, address: int, insn: bytes, readable: bool) -> str:
    if not readable:
        return "recorded address is outside the executable sections"
    if _got_fentry(image, address):
        return REFUSED_GOT_CALL
    if insn == _ONE_BYTE_NOPS:
        return REFUSED_ONE_BYTE_NOPS
    return f"recorded address holds {insn.hex(' ')}, not nop5 or call {FENTRY_SYMBOL}"


# -- call / jmp ---------------------------------------------------------------


def _callee_mask(image: ElfImage, targets: np.ndarray, calls_to: Sequence[str]) -> np.ndarray:
    """Per link-time target: does any of its names match ``calls_to`` (see ElfImage.names_of)."""
    table = image.table
    result = np.zeros(len(targets), dtype=bool)
    if not len(targets):
        return result
    matched = np.zeros(len(table) + 1, dtype=bool)
    matched[table.select(calls_to)] = True
    first = search(table.starts, targets)
    is_start = np.zeros(len(targets), dtype=bool)
    in_range = first < len(table)
    is_start[in_range] = table.starts[first[in_range]] == targets[in_range]
    result[is_start] = matched[first[is_start]]
    match_names = compile_globs(calls_to)
    assert match_names is not None
    stubs = [stub for stub in image.plt if match_names(image.names_of(stub))]
    if stubs:
        result |= np.isin(targets, np.asarray(stubs, dtype=np.uint64))
    if any(is_glob(g) or "+" in g for g in calls_to):
        # A target inside a function answers to "f+0x1c": globs may match that.
        rest = np.flatnonzero(~is_start & ~result)
        inside = rest[table.indices_at(targets[rest]) >= 0]
        match = compile_glob(calls_to)
        assert match is not None
        unique, inverse = np.unique(targets[inside], return_inverse=True)
        hits = np.asarray([match(image.name_of(t) or "") for t in unique.tolist()], dtype=bool)
        if len(hits):
            result[inside] = hits[inverse]
    return result


def _candidate_functions(image: ElfImage, calls_to: Sequence[str], *, calls: bool, jmps: bool) -> np.ndarray:
    """Functions holding an e8/e9 byte whose rel32 would reach a wanted callee
    (a superset of those with such a site: decoding decides)."""
    table = image.table
    found: list[np.ndarray] = []
    lo = min((s.address for s in image.code), default=0)
    hi = max((s.end for s in image.code), default=0)
    for section in image.code:
        data = np.frombuffer(section.data, dtype=np.uint8)
        if len(data) < CALL_SIZE:
            continue
        head = data[: len(data) - CALL_SIZE + 1]
        opcodes = np.zeros(len(head), dtype=bool)
        if calls:
            opcodes |= head == CALL_OPCODE
        if jmps:
            opcodes |= head == JMP_OPCODE
        positions = np.flatnonzero(opcodes)
        if not len(positions):
            continue
        insn = data[positions[:, None] + np.arange(CALL_SIZE)]
        addresses = positions.astype(np.uint64) + np.uint64(section.address)
        targets = _rel32_targets(addresses, insn)
        # Only targets inside this image's code can be named.
        near = (targets >= lo) & (targets < hi)
        addresses, targets = addresses[near], targets[near]
        wanted = _callee_mask(image, targets, calls_to)
        found.append(addresses[wanted])
    if not found:
        return np.zeros(0, dtype=np.int64)
    owners = table.indices_at(np.concatenate(found))
    return unique(owners[owners >= 0])


def _branches(image: ElfImage, chosen: np.ndarray, base: int, *, calls: bool, jmps: bool,
              calls_to: Sequence[str]) -> tuple[SiteColumns, list[str]]:
    """Decode each chosen function once; collect 5-byte call/jmp rel32 instructions."""
    table: FunctionTable = image.table
    undecodable: list[str] = []
    # Sentinels that never equal a real code keep the hot loop to two compares.
    call_code = Code.CALL_REL32_64 if calls else -1
    jmp_code = Code.JMP_REL32_64 if jmps else -1
    invalid = Code.INVALID
    instr = Instruction()
    addresses: list[int] = []
    owners: list[int] = []
    kinds: list[int] = []
    starts = table.starts[chosen].tolist()
    ends = table.ends[chosen].tolist()
    sections = sorted(image.code, key=lambda s: s.address)
    for index, start, end in zip(chosen.tolist(), starts, ends):
        section = next((s for s in sections if s.address <= start and end <= s.end), None)
        if section is None:
            undecodable.append(table.name(index))
            continue
        decoder = Decoder(64, section.data[start - section.address : end - section.address], ip=start)
        decode = decoder.decode_out
        found: list[tuple[int, int]] = []
        ok = True
        while decoder.can_decode:
            decode(instr)
            code = instr.code
            if code == call_code or code == jmp_code:
                # len 5 rules out prefixed forms (e.g. ``bnd call``): not one 5-byte site.
                if instr.len == CALL_SIZE:
                    found.append((instr.ip, 1 if code == call_code else 2))
            elif code == invalid:
                ok = False
                break
        if not ok:
            # Data or padding the decoder cannot read: boundaries after it are guesses.
            undecodable.append(table.name(index))
            continue
        for ip, kind in found:
            addresses.append(ip)
            owners.append(index)
            kinds.append(kind)
    link = np.asarray(addresses, dtype=np.uint64)
    owner = np.asarray(owners, dtype=np.int64)
    kind = np.asarray(kinds, dtype=np.uint8)
    insn, _ = gather(image, link)
    targets = _rel32_targets(link, insn) if len(link) else np.zeros(0, np.uint64)
    if calls_to:
        keep = _callee_mask(image, targets, calls_to)
        link, owner, kind, insn, targets = link[keep], owner[keep], kind[keep], insn[keep], targets[keep]
    columns = SiteColumns(
        address=link + np.uint64(base),
        kind=kind,
        insn=insn,
        function=owner,
        offset=link - table.starts[owner] if len(owner) else np.zeros(0, np.uint64),
        target=targets + np.uint64(base),
        reason=np.where(kind == 1, _R_CALL, _R_JMP).astype(np.uint8),
    )
    return columns, undecodable


# -- scanning -----------------------------------------------------------------


def scan_sites(
    path_or_elf: str | os.PathLike[str] | ElfImage,
    *,
    kinds: Collection[SiteKind] = DEFAULT_KINDS,
    functions: Sequence[str] = (),
    calls_to: Sequence[str] = (),
    base: int = 0,
) -> SiteScan:
    """Find sites and account for what was skipped; see :func:`find_sites`."""
    image = _image(path_or_elf)
    kinds = frozenset(kinds)
    functions = tuple(g for g in functions if g)
    calls_to = tuple(calls_to)
    table = image.table
    selected = table.select(functions)
    parts: list[SiteColumns] = []
    refused: list[tuple[int, str]] = []
    undecodable: list[str] = []
    # A fentry site has no callee: with calls_to, only call/jmp sites can match.
    if SiteKind.FENTRY in kinds and not calls_to:
        fentry, refused = _fentry(image, selected if functions else None, base)
        parts.append(fentry)
    calls, jmps = SiteKind.CALL in kinds, SiteKind.JMP in kinds
    if calls or jmps:
        chosen = selected
        if calls_to:
            candidates = _candidate_functions(image, calls_to, calls=calls, jmps=jmps)
            chosen = np.intersect1d(selected, candidates) if functions else candidates
        branches, undecodable = _branches(image, chosen, base, calls=calls, jmps=jmps, calls_to=calls_to)
        parts.append(branches)
    columns = SiteColumns.concat(parts)
    if len(columns):
        # Sorted by address; overlapping functions can yield one address twice:
        # keep the innermost function's (smallest offset), a fentry site over a call.
        order = np.lexsort((columns.kind, columns.offset, columns.address))  # fentry before call
        columns = columns.take(order)
        unique = np.ones(len(columns), dtype=bool)
        unique[1:] = columns.address[1:] != columns.address[:-1]
        if not unique.all():
            columns = columns.take(np.flatnonzero(unique))
    return SiteScan(
        path=image.path,
        base=base,
        columns=columns,
        functions_scanned=len(selected),
        undecodable=tuple(undecodable),
        refused=tuple(refused),
        image=image,
        query=Query(kinds=kinds, functions=functions, calls_to=calls_to),
    )


def find_sites(
    path: str | os.PathLike[str] | ElfImage,
    *,
    kinds: Collection[SiteKind] = DEFAULT_KINDS,
    functions: Sequence[str] = (),
    calls_to: Sequence[str] = (),
    base: int = 0,
) -> list[Site]:
    """The sites of the ELF at ``path``, sorted by address, at link address + ``base``.

    ``functions`` and ``calls_to`` are fnmatch globs over function names (any
    alias, mangled or demangled) and callee names (``malloc`` also matches
    ``malloc@plt``); with ``calls_to`` only call/jmp sites are returned.
    """
    return list(scan_sites(path, kinds=kinds, functions=functions, calls_to=calls_to, base=base).sites)


__all__ = [
    "DEFAULT_KINDS",
    "FENTRY_SYMBOL",
    "KINDS",
    "REASONS",
    "REASON_CALL",
    "REASON_ENTRY",
    "REASON_FENTRY_CALL",
    "REASON_FENTRY_CALL_ENTRY",
    "REASON_JMP",
    "REASON_MCOUNT",
    "REASON_PATCHABLE",
    "REFUSED_GOT_CALL",
    "REFUSED_NOT_BOUNDARY",
    "REFUSED_NO_FUNCTION",
    "REFUSED_ONE_BYTE_NOPS",
    "Query",
    "Site",
    "SiteColumns",
    "SiteKind",
    "SiteScan",
    "branch_target",
    "compile_globs",
    "fentry_targets",
    "find_sites",
    "gather",
    "materialize",
    "scan_sites",
]
