"""The tables of a linked binary that name addresses: relocations, ``__mcount_loc``, GOT, PLT.

Read as numpy arrays from the raw section bytes (RELA entries, u64 pointer
tables); the PLT stubs are decoded one by one (a few hundred at most) to
learn which GOT slot each jumps through.
"""

from __future__ import annotations

import numpy as np
from iced_x86 import Code, Decoder, Instruction

from ._arrays import unique
from .elffile import SHF_ALLOC, SHT_NOBITS, SHT_RELA, ElfFile, Section

_R_X86_64_64 = 1
_R_X86_64_GLOB_DAT = 6
_R_X86_64_JUMP_SLOT = 7
_R_X86_64_RELATIVE = 8
_R_X86_64_IRELATIVE = 37

RELA_DTYPE = np.dtype([("offset", "<u8"), ("info", "<u8"), ("addend", "<i8")])
PLT_SECTIONS = (".plt", ".plt.sec", ".plt.got")


def relocations(elf: ElfFile) -> np.ndarray:
    tables = [
        np.frombuffer(elf.data(s)[: s.size // RELA_DTYPE.itemsize * RELA_DTYPE.itemsize], dtype=RELA_DTYPE)
        for s in elf.sections
        if s.type == SHT_RELA and s.flags & SHF_ALLOC and s.entsize == RELA_DTYPE.itemsize
    ]
    return np.concatenate(tables) if tables else np.zeros(0, dtype=RELA_DTYPE)


def address_table(elf: ElfFile, section: Section | None, relas: np.ndarray, dyn_values: np.ndarray) -> np.ndarray:
    """Addresses in a table of u64 pointers like ``__mcount_loc``, sorted, no zeros.

    A non-PIE table holds absolute addresses.  In a PIE or shared object the
    words hold the addresses themselves when relocations are packed (RELR,
    implicit addends) and zeros with RELA relocations (``R_X86_64_RELATIVE``:
    the addend; ``R_X86_64_64``: symbol + addend), which are applied here.
    """
    if section is None or section.type == SHT_NOBITS:
        return np.zeros(0, dtype=np.uint64)
    data = elf.data(section)
    values = np.frombuffer(data[: len(data) // 8 * 8], dtype="<u8").astype(np.uint64)
    if len(relas):
        offset = relas["offset"]
        inside = (offset >= section.addr) & (offset < section.addr + len(values) * 8) & (offset % 8 == section.addr % 8)
        chosen = relas[inside]
        kind = chosen["info"] & 0xFFFF_FFFF
        slot = ((chosen["offset"] - section.addr) // 8).astype(np.int64)
        relative = kind == _R_X86_64_RELATIVE
        values[slot[relative]] = chosen["addend"][relative].astype(np.uint64)
        absolute = kind == _R_X86_64_64
        index = (chosen["info"][absolute] >> 32).astype(np.int64)
        ok = index < len(dyn_values)
        values[slot[absolute][ok]] = dyn_values[index[ok]] + chosen["addend"][absolute][ok].astype(np.uint64)
    values = unique(values)
    return values[values != 0]


def got_names(relas: np.ndarray, dyn: np.ndarray, dyn_names: list[str] | None,
               ifunc_by_resolver: dict[int, str]) -> dict[int, str]:
    """GOT slot -> function name, from JUMP_SLOT/GLOB_DAT (symbol) and IRELATIVE (resolver)."""
    slots: dict[int, str] = {}
    if not len(relas):
        return slots
    kind = relas["info"] & 0xFFFF_FFFF
    index = (relas["info"] >> 32).astype(np.int64)
    named = ((kind == _R_X86_64_JUMP_SLOT) | (kind == _R_X86_64_GLOB_DAT)) & (index > 0) & (index < len(dyn))
    if dyn_names is not None:
        for offset, i in zip(relas["offset"][named].tolist(), index[named].tolist()):
            name = dyn_names[i]
            if name:
                slots[offset] = name
    irelative = kind == _R_X86_64_IRELATIVE
    for offset, addend in zip(relas["offset"][irelative].tolist(), relas["addend"][irelative].tolist()):
        # A local call to an ifunc (e.g. libc calling its own memcpy): the slot
        # is filled by the resolver, which the IFUNC symbol names.
        if addend in ifunc_by_resolver:
            slots[offset] = ifunc_by_resolver[addend]
    return slots


def plt_names(elf: ElfFile, slots: dict[int, str]) -> tuple[dict[int, str], dict[int, int]]:
    """Name every PLT stub by the GOT slot its indirect ``jmp`` goes through.

    Decoding the stubs instead of counting entries works for every layout ld
    emits: lazy ``.plt`` (after the PLT0 header), IBT ``.plt.sec`` (the ``.plt``
    entries there only push and jump to PLT0 and get no name), and ``.plt.got``
    (GLOB_DAT slots of functions both called and address-taken).
    """
    names: dict[int, str] = {}
    sizes: dict[int, int] = {}
    instr = Instruction()
    for section_name in PLT_SECTIONS:
        section = elf.section(section_name)
        if section is None or section.type == SHT_NOBITS:
            continue
        data = elf.data(section)
        entry = section.entsize or 16
        for offset in range(0, len(data) - entry + 1, entry):
            decoder = Decoder(64, data[offset : offset + entry], ip=section.addr + offset)
            while decoder.can_decode:
                decoder.decode_out(instr)
                if instr.code == Code.INVALID:
                    break
                if instr.code == Code.JMP_RM64 and instr.is_ip_rel_memory_operand:
                    slot_name = slots.get(instr.ip_rel_memory_address)
                    if slot_name is not None:
                        names[section.addr + offset] = f"{slot_name}@plt"
                        sizes[section.addr + offset] = entry
                    break
    return names, sizes


__all__ = ["PLT_SECTIONS", "RELA_DTYPE", "address_table", "got_names", "plt_names", "relocations"]
