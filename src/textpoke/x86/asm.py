"""A small assembler over iced-x86 for the code textpoke generates.

iced-x86's Python binding has instruction constructors and a block encoder but
no assembler; :class:`Asm` adds labels and picks the constructor from the
operand types, so generated code reads like a listing::

    a = Asm()
    a.label("loop")
    a.op("MOV_R64_RM64", R.RAX, mem(R.RDX, 168))
    a.jump("JNE_REL32_64", "loop")
    code, labels = a.assemble(base)

Labels are resolved by iced's BlockEncoder, which treats instruction ips as
label ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from iced_x86 import (
    BlockEncoder,
    Code,
    Decoder,
    Instruction,
    MemoryOperand,
    Register,
)

R = Register

__all__ = ["Asm", "Imm64", "R", "fs", "mem"]

def mem(base: int = Register.NONE, displ: int = 0, *, index: int = Register.NONE, scale: int = 1) -> MemoryOperand:
    """``[base + index*scale + displ]``; with ``base=R.RIP``, ``displ`` is the
    absolute target (iced computes the rip-relative displacement)."""
    if base == Register.RIP:
        return MemoryOperand(base, index, scale, displ, 8)
    return MemoryOperand(base, index, scale, displ, 1 if displ else 0)


def fs(offset: int) -> MemoryOperand:
    """``fs:[offset]``: thread-local, absolute displacement (``fs:[0]`` is the thread
    pointer itself in the x86-64 TLS ABI)."""
    return MemoryOperand(Register.NONE, Register.NONE, 1, offset, 4, False, Register.FS)


@dataclass(frozen=True)
class Imm64:
    """A 64-bit immediate (``mov r64, imm64``); plain ints are 32-bit immediates."""

    value: int


@cache
def _operand_is_immediate(code_name: str, position: int) -> bool:
    # Registers are plain ints in the binding, so the Code name tells them
    # apart: its operand tokens (MOV_R64_IMM64 -> R64, IMM64) name each kind.
    tokens = code_name.split("_")[1:]
    return position < len(tokens) and tokens[position].startswith("IMM")


class Asm:
    """Collects instructions and labels; :meth:`assemble` encodes them at an address."""

    # Label ids live far above any address a block is placed at.
    _LABEL_BASE = 0x7FFF_0000_0000_0000

    def __init__(self, *, bitness: int = 64) -> None:
        self.bitness = bitness
        self._instructions: list[Instruction] = []
        self._labels: dict[str, int] = {}
        self._defined: set[str] = set()
        self._pending: list[str] = []

    def _label_id(self, name: str) -> int:
        if name not in self._labels:
            self._labels[name] = self._LABEL_BASE + len(self._labels) * 16
        return self._labels[name]

    def _emit(self, instruction: Instruction) -> None:
        if self._pending:
            # Several names for one instruction share one id.
            ident = self._label_id(self._pending[0])
            for name in self._pending[1:]:
                self._labels[name] = ident
            instruction.ip = ident
            self._pending.clear()
        self._instructions.append(instruction)

    def label(self, name: str) -> None:
        """Name the next instruction."""
        if name in self._defined:
            raise ValueError(f"label {name!r} defined twice")
        if name in self._labels and self._pending:
            raise ValueError(f"label {name!r} was referenced before and cannot alias another")
        self._defined.add(name)
        self._pending.append(name)

    def op(self, code_name: str, *operands: object, lock: bool = False) -> None:
        """One instruction; ``code_name`` is an iced ``Code`` member name."""
        code = getattr(Code, code_name)
        kinds = []
        for position, operand in enumerate(operands):
            if isinstance(operand, MemoryOperand):
                kinds.append("mem")
            elif isinstance(operand, Imm64):
                kinds.append("u64")
            elif _operand_is_immediate(code_name, position):
                kinds.append("i32" if operand < 0 else "u32")
            else:
                kinds.append("reg")
        args = [o.value if isinstance(o, Imm64) else o for o in operands]
        instruction = getattr(Instruction, "create" + "".join(f"_{k}" for k in kinds))(code, *args)
        instruction.has_lock_prefix = lock
        self._emit(instruction)

    def jump(self, code_name: str, label: str) -> None:
        """A branch (jmp/jcc/call rel) to a label of this block."""
        self._emit(Instruction.create_branch(getattr(Code, code_name), self._label_id(label)))

    def branch_to(self, code_name: str, address: int) -> None:
        """A branch to an absolute address outside the block."""
        self._emit(Instruction.create_branch(getattr(Code, code_name), address))

    def data(self, payload: bytes) -> None:
        """Raw bytes (constants, strings) placed inline."""
        for start in range(0, len(payload), 16):
            chunk = payload[start : start + 16]
            self._emit(getattr(Instruction, f"create_declare_byte_{len(chunk)}")(*chunk))

    def assemble(self, base: int) -> tuple[bytes, dict[str, int]]:
        """Encode at ``base``: the bytes and the address of every label."""
        if self._pending:
            raise ValueError(f"labels {self._pending} name no instruction")
        missing = set(self._labels) - self._defined
        if missing:
            raise ValueError(f"labels {sorted(missing)} are used but never defined")
        encoder = BlockEncoder(self.bitness)
        encoder.add_many(self._instructions)
        code = encoder.encode(base)
        # BlockEncoder may shorten branches: read the offsets back by decoding.
        decoder = Decoder(self.bitness, code, ip=base)
        ids: dict[int, int] = {}
        for instruction in self._instructions:
            ids.setdefault(instruction.ip, decoder.ip)
            if instruction.code == Code.DECLAREBYTE:
                decoder.position += instruction.declare_data_len
                decoder.ip += instruction.declare_data_len
            else:
                decoder.decode()
        return code, {name: ids[ident] for name, ident in self._labels.items()}
