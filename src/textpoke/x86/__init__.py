"""x86 facts shared by every stage: site instructions, their encoding, emulation."""

from .insn import (
    CALL_OPCODE,
    CALL_SIZE,
    INT3,
    INT3_BYTE,
    JMP_OPCODE,
    NOP5,
    SITE_SIZE,
    InsnKind,
    SiteInsn,
    decode_site,
    encode_call,
    encode_jmp,
    encode_site,
    rel32_target,
)
from .emulate import (
    WORD_SIZES,
    Memory,
    RegisterFrame,
    emulate_call,
    emulate_jmp,
    emulate_push,
)

__all__ = [
    "CALL_OPCODE",
    "CALL_SIZE",
    "INT3",
    "INT3_BYTE",
    "JMP_OPCODE",
    "NOP5",
    "SITE_SIZE",
    "InsnKind",
    "SiteInsn",
    "decode_site",
    "encode_call",
    "encode_jmp",
    "encode_site",
    "rel32_target",
    "WORD_SIZES",
    "Memory",
    "RegisterFrame",
    "emulate_call",
    "emulate_jmp",
    "emulate_push",
]
