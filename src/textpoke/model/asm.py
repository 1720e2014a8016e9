"""A small two-pass assembler over iced-x86 for the model's kernel text.

Instructions are built as iced-x86 ``Instruction`` objects; labels are resolved
in a second pass.  Every branch uses its rel32 form and no operand is
RIP-relative, so an instruction's length does not depend on where it lands and
two passes are exact (the second pass checks it).  Patchable sites are 5 raw
bytes produced by :mod:`textpoke.x86.insn`, never spelled here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import iced_x86 as ix

from ..x86.insn import SITE_SIZE

C = ix.Code
R = ix.Register
M = ix.MemoryOperand

Resolver = Callable[[str], int]
InsnFactory = Callable[[Resolver], ix.Instruction]
SiteBytes = Callable[[int, Resolver], bytes]


class Role(enum.Enum):
    """What an instruction does to control flow, as far as the checks care."""

    PLAIN = "plain"
    CALL = "call"
    RET = "ret"
    IRET = "iret"
    SITE = "site"


_ROLE_OF_CODE = {
    C.CALL_REL32_64: Role.CALL,
    C.CALL_REL32_32: Role.CALL,
    C.RETNQ: Role.RET,
    C.RETND: Role.RET,
    C.IRETQ: Role.IRET,
    C.IRETD: Role.IRET,
}


@dataclass(frozen=True)
class Placed:
    """One instruction of the assembled text."""

    addr: int
    length: int
    role: Role
    site: str | None = None


@dataclass(frozen=True)
class Image:
    """Assembled text: bytes, label addresses and every instruction start."""

    base: int
    code: bytes
    symbols: Mapping[str, int]
    insns: tuple[Placed, ...]

    def symbolize(self, addr: int) -> str:
        """``label+off`` for the nearest label at or below ``addr``."""
        best_name, best_addr = None, -1
        for name, at in self.symbols.items():
            if best_addr < at <= addr:
                best_name, best_addr = name, at
        if best_name is None:
            return f"{addr:#x}"
        return best_name if best_addr == addr else f"{best_name}+{addr - best_addr:#x}"


@dataclass(frozen=True)
class _Insn:
    factory: InsnFactory


@dataclass(frozen=True)
class _Site:
    name: str
    initial: SiteBytes


@dataclass(frozen=True)
class _Label:
    name: str


class Asm:
    """Builder for one text: ``label``, instruction helpers, ``site``; then ``assemble``."""

    def __init__(self, bits: int) -> None:
        if bits not in (32, 64):
            raise ValueError(f"bits must be 32 or 64, not {bits}")
        self.bits = bits
        self._items: list[_Insn | _Site | _Label] = []

    # -- structure ---------------------------------------------------------------

    def label(self, name: str) -> None:
        self._items.append(_Label(name))

    def insn(self, factory: InsnFactory) -> None:
        self._items.append(_Insn(factory))

    def site(self, name: str, initial: SiteBytes) -> None:
        """A patchable 5-byte site, labelled ``name``; ``initial(addr, resolve)`` gives its bytes."""
        self._items.append(_Label(name))
        self._items.append(_Site(name, initial))

    # -- instruction helpers (word-sized unless the name says otherwise) -----------

    def _w(self, code64: int, code32: int) -> int:
        return code64 if self.bits == 64 else code32

    def push(self, reg: int) -> None:
        code = self._w(C.PUSH_R64, C.PUSH_R32)
        self.insn(lambda _r: ix.Instruction.create_reg(code, reg))

    def pop(self, reg: int) -> None:
        code = self._w(C.POP_R64, C.POP_R32)
        self.insn(lambda _r: ix.Instruction.create_reg(code, reg))

    def push_mem(self, base: int, disp: int) -> None:
        code = self._w(C.PUSH_RM64, C.PUSH_RM32)
        self.insn(lambda _r: ix.Instruction.create_mem(code, M(base, displ=disp)))

    def push_imm8(self, value: int) -> None:
        code = self._w(C.PUSHQ_IMM8, C.PUSHD_IMM8)
        self.insn(lambda _r: ix.Instruction.create_i32(code, value))

    def push_seg(self, seg: int) -> None:
        codes = {R.DS: C.PUSHD_DS, R.ES: C.PUSHD_ES, R.FS: C.PUSHD_FS, R.GS: C.PUSHD_GS, R.SS: C.PUSHD_SS}
        code = codes[seg]
        self.insn(lambda _r: ix.Instruction.create_reg(code, seg))

    def pop_seg(self, seg: int) -> None:
        codes = {R.DS: C.POPD_DS, R.ES: C.POPD_ES, R.FS: C.POPD_FS, R.GS: C.POPD_GS}
        code = codes[seg]
        self.insn(lambda _r: ix.Instruction.create_reg(code, seg))

    def pushf(self) -> None:
        code = self._w(C.PUSHFQ, C.PUSHFD)
        self.insn(lambda _r: ix.Instruction.create(code))

    def popf(self) -> None:
        code = self._w(C.POPFQ, C.POPFD)
        self.insn(lambda _r: ix.Instruction.create(code))

    def mov(self, dst: int, src: int) -> None:
        code = self._w(C.MOV_R64_RM64, C.MOV_R32_RM32)
        self.insn(lambda _r: ix.Instruction.create_reg_reg(code, dst, src))

    def load(self, dst: int, base: int, disp: int = 0) -> None:
        code = self._w(C.MOV_R64_RM64, C.MOV_R32_RM32)
        self.insn(lambda _r: ix.Instruction.create_reg_mem(code, dst, M(base, displ=disp)))

    def store(self, base: int, disp: int, src: int) -> None:
        code = self._w(C.MOV_RM64_R64, C.MOV_RM32_R32)
        self.insn(lambda _r: ix.Instruction.create_mem_reg(code, M(base, displ=disp), src))

    def store_imm(self, base: int, disp: int, value: int) -> None:
        code = self._w(C.MOV_RM64_IMM32, C.MOV_RM32_IMM32)
        self.insn(lambda _r: ix.Instruction.create_mem_i32(code, M(base, displ=disp), value))

    def lea(self, dst: int, base: int, index: int = R.NONE, disp: int = 0) -> None:
        code = self._w(C.LEA_R64_M, C.LEA_R32_M)
        self.insn(lambda _r: ix.Instruction.create_reg_mem(code, dst, M(base, index, 1, disp)))

    def add_imm8(self, reg: int, value: int) -> None:
        code = self._w(C.ADD_RM64_IMM8, C.ADD_RM32_IMM8)
        self.insn(lambda _r: ix.Instruction.create_reg_i32(code, reg, value))

    def add_mem_imm8(self, base: int, disp: int, value: int) -> None:
        code = self._w(C.ADD_RM64_IMM8, C.ADD_RM32_IMM8)
        self.insn(lambda _r: ix.Instruction.create_mem_i32(code, M(base, displ=disp), value))

    def sub_imm8(self, reg: int, value: int) -> None:
        code = self._w(C.SUB_RM64_IMM8, C.SUB_RM32_IMM8)
        self.insn(lambda _r: ix.Instruction.create_reg_i32(code, reg, value))

    def and_imm32(self, reg: int, value: int) -> None:
        code = self._w(C.AND_RM64_IMM32, C.AND_RM32_IMM32)
        self.insn(lambda _r: ix.Instruction.create_reg_i32(code, reg, value))

    def and_imm8(self, reg: int, value: int) -> None:
        code = self._w(C.AND_RM64_IMM8, C.AND_RM32_IMM8)
        self.insn(lambda _r: ix.Instruction.create_reg_i32(code, reg, value))

    def shl_imm8(self, reg: int, value: int) -> None:
        code = self._w(C.SHL_RM64_IMM8, C.SHL_RM32_IMM8)
        self.insn(lambda _r: ix.Instruction.create_reg_u32(code, reg, value))

    def inc_mem(self, base: int, disp: int) -> None:
        code = self._w(C.INC_RM64, C.INC_RM32)
        self.insn(lambda _r: ix.Instruction.create_mem(code, M(base, displ=disp)))

    def xor32(self, dst: int, src: int) -> None:
        self.insn(lambda _r: ix.Instruction.create_reg_reg(C.XOR_R32_RM32, dst, src))

    def test_mem8(self, base: int, disp: int, value: int) -> None:
        self.insn(lambda _r: ix.Instruction.create_mem_u32(C.TEST_RM8_IMM8, M(base, displ=disp), value))

    def call(self, label: str) -> None:
        code = self._w(C.CALL_REL32_64, C.CALL_REL32_32)
        self.insn(lambda r: ix.Instruction.create_branch(code, r(label)))

    def jmp(self, label: str) -> None:
        code = self._w(C.JMP_REL32_64, C.JMP_REL32_32)
        self.insn(lambda r: ix.Instruction.create_branch(code, r(label)))

    def jnz(self, label: str) -> None:
        code = self._w(C.JNE_REL32_64, C.JNE_REL32_32)
        self.insn(lambda r: ix.Instruction.create_branch(code, r(label)))

    def jz(self, label: str) -> None:
        code = self._w(C.JE_REL32_64, C.JE_REL32_32)
        self.insn(lambda r: ix.Instruction.create_branch(code, r(label)))

    def ret(self) -> None:
        code = self._w(C.RETNQ, C.RETND)
        self.insn(lambda _r: ix.Instruction.create(code))

    def iret(self) -> None:
        code = self._w(C.IRETQ, C.IRETD)
        self.insn(lambda _r: ix.Instruction.create(code))

    # -- assembly -----------------------------------------------------------------

    def assemble(self, base: int) -> Image:
        """Two passes: lay out with every label at ``base``, then encode for real."""
        lengths = self._pass(base, resolve=lambda _name: base, lengths=None)[2]
        code, symbols, _, placed = self._pass(base, resolve=None, lengths=lengths)
        return Image(base=base, code=code, symbols=symbols, insns=tuple(placed))

    def _layout(self, base: int, lengths: list[int]) -> dict[str, int]:
        symbols: dict[str, int] = {}
        at, i = base, 0
        for item in self._items:
            if isinstance(item, _Label):
                if item.name in symbols:
                    raise ValueError(f"label {item.name!r} defined twice")
                symbols[item.name] = at
            else:
                at += lengths[i]
                i += 1
        return symbols

    def _pass(
        self, base: int, *, resolve: Resolver | None, lengths: list[int] | None
    ) -> tuple[bytes, dict[str, int], list[int], list[Placed]]:
        symbols = self._layout(base, lengths) if lengths is not None else {}
        if resolve is None:
            def resolve(name: str) -> int:
                return symbols[name]

        out = bytearray()
        sizes: list[int] = []
        placed: list[Placed] = []
        encoder_bits = self.bits
        for item in self._items:
            if isinstance(item, _Label):
                continue
            at = base + len(out)
            if isinstance(item, _Site):
                data = item.initial(at, resolve)
                if len(data) != SITE_SIZE:
                    raise ValueError(f"site {item.name!r}: {len(data)} bytes, expected {SITE_SIZE}")
                placed.append(Placed(at, SITE_SIZE, Role.SITE, item.name))
            else:
                instr = item.factory(resolve)
                encoder = ix.Encoder(encoder_bits)
                encoder.encode(instr, at)
                data = bytes(encoder.take_buffer())
                placed.append(Placed(at, len(data), _ROLE_OF_CODE.get(instr.code, Role.PLAIN)))
            if lengths is not None and len(data) != lengths[len(sizes)]:
                raise AssertionError(f"instruction at {at:#x} changed length between passes")
            sizes.append(len(data))
            out += data
        return bytes(out), symbols, sizes, placed


def disassemble(bits: int, addr: int, data: bytes) -> tuple[str, int]:
    """Text (AT&T, like the kernel sources) and length of the instruction at ``addr``."""
    decoder = ix.Decoder(bits, data, ip=addr)
    instr = decoder.decode()
    if instr.code == C.INVALID:
        return f"(bad) {data[:1].hex()}", 1
    return _FORMATTER.format(instr), instr.len


_FORMATTER = ix.Formatter(ix.FormatterSyntax.GAS)
_FORMATTER.first_operand_char_index = 8
