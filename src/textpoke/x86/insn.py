"""The 5-byte instructions textpoke rewrites, and the one place they are encoded.

A patchable site is a single 5-byte instruction: ``nop5``, ``call rel32`` or
``jmp rel32``.  Every byte constant and encoding rule of the project lives here;
no other module spells ``0xe8``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._errors import SiteError

if TYPE_CHECKING:  # numpy is imported by the array functions only (the CLI starts without it)
    import numpy as np

#: The breakpoint instruction written over a site's first byte while it changes.
INT3_BYTE = 0xCC
INT3 = bytes([INT3_BYTE])
#: ``nopl 0x0(%rax,%rax,1)``: what gcc emits for ``-mfentry -mnop-mcount``.
NOP5 = bytes.fromhex("0f1f440000")
CALL_OPCODE = 0xE8
JMP_OPCODE = 0xE9
RET_BYTE = 0xC3
#: ``endbr64``: the first instruction of functions built with -fcf-protection.
ENDBR64 = bytes.fromhex("f30f1efa")
#: ``call *disp32(%rip)`` opcode bytes (6 bytes in all): the fentry call of PIE builds.
CALL_RIP_INDIRECT = bytes.fromhex("ff15")
#: jmp [rip+disp32]: a hot-fix's far-call stub is this, disp32 0, then the 8-byte target.
JMP_RIP_INDIRECT = bytes.fromhex("ff25")
#: The one-byte ``nop`` (what -fpatchable-function-entry emits, N of them).
NOP1_BYTE = 0x90
#: Length of every site instruction (call rel32, jmp rel32, nop5).
CALL_SIZE = 5
SITE_SIZE = CALL_SIZE

_REL32_MIN = -(2**31)
_REL32_MAX = 2**31 - 1


class InsnKind(enum.Enum):
    """What a 5-byte site instruction does."""

    NOP = "nop"
    CALL = "call"
    JMP = "jmp"


@dataclass(frozen=True)
class SiteInsn:
    """A decoded site instruction: its kind and, for call/jmp, its target."""

    kind: InsnKind
    target: int | None = None


def rel32(site: int, target: int) -> int:
    """Displacement of a rel32 call/jmp at ``site`` to ``target``; checks reach."""
    disp = target - (site + CALL_SIZE)
    if not _REL32_MIN <= disp <= _REL32_MAX:
        raise SiteError(
            f"target {target:#x} is out of rel32 reach of site {site:#x}",
            hint="trampolines must be mapped within +-2 GiB of the sites they serve",
        )
    return disp


def encode_call(site: int, target: int) -> bytes:
    """``call target`` as placed at address ``site``."""
    return bytes([CALL_OPCODE]) + struct.pack("<i", rel32(site, target))


def encode_jmp(site: int, target: int) -> bytes:
    """``jmp target`` as placed at address ``site``."""
    return bytes([JMP_OPCODE]) + struct.pack("<i", rel32(site, target))


def rel32_target(site: int, insn: bytes) -> int:
    """Absolute target of the rel32 call/jmp ``insn`` placed at ``site``."""
    (disp,) = struct.unpack_from("<i", insn, 1)
    return (site + CALL_SIZE + disp) & 0xFFFF_FFFF_FFFF_FFFF


def decode_site(site: int, insn: bytes) -> SiteInsn:
    """Decode the 5 bytes at ``site``; anything but nop5/call/jmp is refused."""
    if len(insn) != CALL_SIZE:
        raise SiteError(f"site {site:#x}: expected {CALL_SIZE} bytes, got {len(insn)}")
    if insn == NOP5:
        return SiteInsn(InsnKind.NOP)
    if insn[0] == CALL_OPCODE:
        return SiteInsn(InsnKind.CALL, rel32_target(site, insn))
    if insn[0] == JMP_OPCODE:
        return SiteInsn(InsnKind.JMP, rel32_target(site, insn))
    raise SiteError(
        f"site {site:#x}: bytes {insn.hex(' ')} are not nop5, call rel32 or jmp rel32",
        hint="only single 5-byte instructions can be patched",
    )


# -- the same rules over arrays (a batch of 100,000 sites): numpy, imported when used ---------


def site_insns_ok(rows: np.ndarray) -> np.ndarray:
    """Per row of an (N, 5) u8 array: is it a site instruction (what decode_site accepts)?"""
    import numpy as np

    nop = (rows == np.frombuffer(NOP5, dtype=np.uint8)).all(axis=1)
    return nop | (rows[:, 0] == CALL_OPCODE) | (rows[:, 0] == JMP_OPCODE)


def rel32_targets(sites: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """:func:`rel32_target` of every (site, 5-byte row): u64, wrapping as it does."""
    import numpy as np

    disp = np.ascontiguousarray(rows[:, 1:CALL_SIZE]).view("<i4").ravel().astype(np.int64)
    return np.asarray(sites, dtype=np.uint64) + np.uint64(CALL_SIZE) + disp.astype(np.uint64)


def encode_calls(sites: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """:func:`encode_call` for every (site, target) of two u64 arrays: (N, 5) u8 rows;
    SiteError naming the first target out of rel32 reach."""
    return _encode_rel32s(CALL_OPCODE, sites, targets)


def encode_jmps(sites: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """:func:`encode_jmp` for every (site, target), as :func:`encode_calls`."""
    return _encode_rel32s(JMP_OPCODE, sites, targets)


def _encode_rel32s(opcode: int, sites: np.ndarray, targets: np.ndarray) -> np.ndarray:
    import numpy as np

    sites = np.asarray(sites, dtype=np.uint64)
    disp = np.asarray(targets, dtype=np.uint64).astype(np.int64) - (sites + np.uint64(CALL_SIZE)).astype(np.int64)
    far = np.flatnonzero((disp < _REL32_MIN) | (disp > _REL32_MAX))
    if len(far):
        rel32(int(sites[far[0]]), int(np.asarray(targets, dtype=np.uint64)[far[0]]))  # raises the message
    rows = np.empty((len(sites), CALL_SIZE), dtype=np.uint8)
    rows[:, 0] = opcode
    rows[:, 1:] = disp.astype("<i4").view(np.uint8).reshape(-1, 4)
    return rows


def encode_site(site: int, insn: SiteInsn) -> bytes:
    """Inverse of :func:`decode_site`."""
    if insn.kind is InsnKind.NOP:
        return NOP5
    assert insn.target is not None
    if insn.kind is InsnKind.CALL:
        return encode_call(site, insn.target)
    return encode_jmp(site, insn.target)
