"""What the ELF file says: functions, recorded fentry locations, PLT stubs, code bytes.

pyelftools locates the headers and sections; the tables that can be large (symbol
tables, relocations, ``__mcount_loc``) are read once as raw section bytes and
unpacked with :func:`struct.iter_unpack`, which is ~50x faster than pyelftools'
per-entry objects on a binary like /usr/bin/python3.  Results are cached per file
identity (device, inode, size, mtime), so a file reached through two paths (e.g.
``/proc/PID/map_files/...`` and its real path) is read once.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import Section
from iced_x86 import Code, Decoder, Instruction

from .._errors import ElfError

# ELF constants used on raw table entries (pyelftools decodes them only per entry).
_STT_FUNC = 2
_STT_GNU_IFUNC = 10
_STB_LOCAL, _STB_GLOBAL, _STB_WEAK = 0, 1, 2
_SHN_UNDEF = 0
_SHN_LORESERVE = 0xFF00
_SHF_ALLOC = 0x2
_SHF_EXECINSTR = 0x4
_R_X86_64_64 = 1
_R_X86_64_GLOB_DAT = 6
_R_X86_64_JUMP_SLOT = 7
_R_X86_64_RELATIVE = 8
_R_X86_64_IRELATIVE = 37
_PAGE = 4096

_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
_RELA = struct.Struct("<QQq")  # Elf64_Rela: offset, info, addend
_U64 = struct.Struct("<Q")

#: Sections whose entries record fentry locations (one absolute address each).
MCOUNT_SECTION = "__mcount_loc"
PATCHABLE_SECTION = "__patchable_function_entries"
_PLT_SECTIONS = (".plt", ".plt.sec", ".plt.got")
_CACHE_SIZE = 16


@dataclass(frozen=True)
class Function:
    """A function from the symbol table: ``[address, address + size)`` at link time."""

    name: str
    address: int
    size: int
    #: Other symbols naming the same code (e.g. ``__libc_malloc`` for ``malloc``).
    aliases: tuple[str, ...] = ()

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class CodeSection:
    """An executable section's link-time address and contents."""

    name: str
    address: int
    data: bytes

    @property
    def end(self) -> int:
        return self.address + len(self.data)


@dataclass(frozen=True, eq=False)
class ElfImage:
    """Everything the sites stage needs from one x86-64 ELF file, read once.

    Compared by identity: it is a cache entry, not a value.
    """

    path: str
    #: ``e_type == ET_DYN``: a PIE executable or a shared object (loaded at a bias).
    is_pie: bool
    #: No ``.symtab``: functions come from ``.dynsym`` (exported ones only).
    stripped: bool
    #: ``".symtab"`` or ``".dynsym"``: where :attr:`functions` came from.
    symbol_source: str
    #: Sorted by address; aliases folded into one entry.
    functions: tuple[Function, ...]
    #: Link-time addresses recorded in ``__mcount_loc`` (sorted, no zeros).
    mcount_locs: tuple[int, ...]
    #: Whether the file has an ``__mcount_loc`` section at all.
    has_mcount_section: bool
    #: Link-time addresses recorded in ``__patchable_function_entries``.
    patchable_entries: tuple[int, ...]
    #: PLT stub address -> ``"name@plt"``.
    plt: dict[int, str]
    code: tuple[CodeSection, ...]
    #: Page-rounded ``p_vaddr`` of the PT_LOAD at file offset 0 (for the load bias).
    link_vaddr: int
    _starts: tuple[int, ...] = field(repr=False, compare=False, default=())
    _by_start: dict[int, Function] = field(repr=False, compare=False, default_factory=dict)

    # -- lookups ---------------------------------------------------------------

    def function_at(self, address: int) -> Function | None:
        """The function whose range contains link-time ``address`` (innermost start)."""
        index = bisect.bisect_right(self._starts, address) - 1
        # Overlapping symbols are rare (a nested label-function); look back a little.
        for candidate in self.functions[max(index - 8, 0) : index + 1][::-1]:
            if candidate.address <= address < candidate.end:
                return candidate
        return None

    def function_starting_at(self, address: int) -> Function | None:
        return self._by_start.get(address)

    def section_of(self, address: int) -> CodeSection | None:
        for section in self.code:
            if section.address <= address < section.end:
                return section
        return None

    def read(self, address: int, size: int) -> bytes | None:
        """Bytes of executable sections at link-time ``address``; None if outside."""
        section = self.section_of(address)
        if section is None or address + size > section.end:
            return None
        start = address - section.address
        return section.data[start : start + size]

    def name_of(self, address: int) -> str | None:
        """Symbolic name of a link-time address: ``f``, ``f@plt``, ``f+0x1c`` or None."""
        function = self._by_start.get(address)
        if function is not None:
            return function.name
        stub = self.plt.get(address)
        if stub is not None:
            return stub
        function = self.function_at(address)
        if function is not None:
            return f"{function.name}+{address - function.address:#x}"
        return None

    def names_of(self, address: int) -> tuple[str, ...]:
        """Every name ``address`` answers to (for glob matching): aliases, ``f@plt`` and ``f``."""
        function = self._by_start.get(address)
        if function is not None:
            return function.names
        stub = self.plt.get(address)
        if stub is not None:
            return (stub, stub.removesuffix("@plt"))
        name = self.name_of(address)
        return (name,) if name is not None else ()


# -- reading ------------------------------------------------------------------

_cache: OrderedDict[tuple[int, int, int, int], ElfImage] = OrderedDict()


def open_elf(path: str | os.PathLike[str]) -> ElfImage:
    """Read ``path`` (cached by file identity); refuse anything but an x86-64 ELF."""
    display = os.fspath(path)
    try:
        st = os.stat(display)
    except FileNotFoundError as exc:
        raise ElfError(f"no such file: {display}", hint="give a path to an ELF binary or a pid") from exc
    except OSError as exc:
        raise ElfError(f"cannot read {display}: {exc.strerror}") from exc
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    image = _cache.get(key)
    if image is None:
        image = _load(display)
        _cache[key] = image
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    # The same file reached through another path reports the path it was asked by.
    return image if image.path == display else dataclasses.replace(image, path=display)


def _load(path: str) -> ElfImage:
    try:
        with open(path, "rb") as f:
            return _read(path, f)
    except IsADirectoryError as exc:
        raise ElfError(f"{path} is a directory, not an ELF binary") from exc
    except PermissionError as exc:
        raise ElfError(f"cannot read {path}: permission denied", hint="check the file's permissions") from exc
    except OSError as exc:
        raise ElfError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (_PyElfError, struct.error, ValueError) as exc:
        raise ElfError(
            f"{path} is a corrupt or truncated ELF file: {exc}",
            hint="textpoke reads x86-64 ELF executables and shared objects",
        ) from exc


def _check_header(path: str, f: BinaryIO) -> None:
    """Refuse non-ELF and non-x86-64 files with a precise message before pyelftools."""
    ident = f.read(20)
    f.seek(0)
    if ident[:4] != b"\x7fELF":
        raise ElfError(
            f"{path} is not an ELF file",
            hint="give an x86-64 Linux executable, shared library or a pid",
        )
    if len(ident) < 20:
        raise ElfError(f"{path} is a truncated ELF file")
    elf_class, data = ident[4], ident[5]
    if elf_class != 2:
        bits = {1: "32-bit"}.get(elf_class, f"class {elf_class}")
        raise ElfError(
            f"{path} is a {bits} ELF file; textpoke patches x86-64 (ELFCLASS64) code only",
            hint="use a 64-bit build of the program",
        )
    if data != 1:
        raise ElfError(f"{path} is a big-endian ELF file; textpoke patches x86-64 code only")
    (machine,) = struct.unpack_from("<H", ident, 18)
    if machine != 62:  # EM_X86_64
        raise ElfError(
            f"{path} is an ELF file for machine {machine}, not x86-64 (EM_X86_64 = 62)",
            hint="textpoke patches x86-64 code only",
        )


def _read(path: str, f: BinaryIO) -> ElfImage:
    _check_header(path, f)
    elf = ELFFile(f)
    e_type = elf["e_type"]
    if e_type not in ("ET_EXEC", "ET_DYN"):
        raise ElfError(
            f"{path} is an ELF file of type {e_type}, not an executable or shared object",
            hint="link the object first; sites are found in linked binaries",
        )
    sections = list(elf.iter_sections())
    by_name = {s.name: s for s in sections}
    code = tuple(
        CodeSection(s.name, s["sh_addr"], s.data())
        for s in sections
        if s["sh_type"] == "SHT_PROGBITS"
        and s["sh_flags"] & _SHF_EXECINSTR
        and s["sh_flags"] & _SHF_ALLOC
        and s["sh_size"] > 0
    )
    exec_indices = {
        i for i, s in enumerate(sections) if s["sh_flags"] & _SHF_EXECINSTR and s["sh_flags"] & _SHF_ALLOC
    }

    symtab = by_name.get(".symtab")
    dynsym = by_name.get(".dynsym")
    dyn_symbols = _symbols(elf, dynsym) if dynsym is not None and dynsym["sh_type"] == "SHT_DYNSYM" else []
    functions: tuple[Function, ...] = ()
    source = ""
    if symtab is not None and symtab["sh_type"] == "SHT_SYMTAB":
        functions = _functions(_symbols(elf, symtab), exec_indices)
        source = ".symtab"
    if not functions:
        functions = _functions(dyn_symbols, exec_indices)
        source = ".dynsym"

    relas = [
        _relocations(s)
        for s in sections
        if s["sh_type"] == "SHT_RELA" and s["sh_flags"] & _SHF_ALLOC and s["sh_entsize"] == _RELA.size
    ]
    mcount = by_name.get(MCOUNT_SECTION)
    patchable = by_name.get(PATCHABLE_SECTION)
    link_vaddr = 0
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_LOAD" and segment["p_offset"] < _PAGE:
            link_vaddr = segment["p_vaddr"] & ~(_PAGE - 1)
            break

    starts = tuple(fn.address for fn in functions)
    image = ElfImage(
        path=path,
        is_pie=e_type == "ET_DYN",
        stripped=symtab is None,
        symbol_source=source,
        functions=functions,
        mcount_locs=_address_table(mcount, relas, dyn_symbols),
        has_mcount_section=mcount is not None,
        patchable_entries=_address_table(patchable, relas, dyn_symbols),
        plt=_plt_names(by_name, relas, dyn_symbols),
        code=code,
        link_vaddr=link_vaddr,
        _starts=starts,
        _by_start={fn.address: fn for fn in reversed(functions)},
    )
    return image


@dataclass(frozen=True)
class _Symbol:
    name: str
    kind: int
    binding: int
    shndx: int
    value: int
    size: int


def _symbols(elf: ELFFile, section: Section) -> list[_Symbol]:
    """Raw entries of a symbol table (index order: relocations refer to them by index)."""
    strtab = elf.get_section(section["sh_link"]).data()
    data = section.data()
    usable = len(data) - len(data) % _SYM.size
    symbols = []
    find = strtab.find
    for name_off, info, _other, shndx, value, size in _SYM.iter_unpack(data[:usable]):
        end = find(b"\0", name_off)
        name = strtab[name_off:end].decode("utf-8", "replace") if end > name_off else ""
        symbols.append(_Symbol(name, info & 0xF, info >> 4, shndx, value, size))
    return symbols


def _preference(symbol: _Symbol) -> tuple[int, int, int, str]:
    """Sort key choosing the primary name among aliases: global, then fewest leading
    underscores (``malloc`` over ``__libc_malloc``), then shortest, then alphabetical."""
    binding_rank = {_STB_GLOBAL: 0, _STB_WEAK: 1}.get(symbol.binding, 2)
    underscores = len(symbol.name) - len(symbol.name.lstrip("_"))
    return (binding_rank, underscores, len(symbol.name), symbol.name)


def _functions(symbols: Iterable[_Symbol], exec_indices: set[int]) -> tuple[Function, ...]:
    groups: dict[tuple[int, int], list[_Symbol]] = {}
    for sym in symbols:
        if (
            sym.kind == _STT_FUNC
            and sym.size > 0
            and sym.name
            and _SHN_UNDEF < sym.shndx < _SHN_LORESERVE
            and sym.shndx in exec_indices
        ):
            groups.setdefault((sym.value, sym.size), []).append(sym)
    functions = []
    for (address, size), group in groups.items():
        ordered = sorted(group, key=_preference)
        names = list(dict.fromkeys(s.name for s in ordered))
        functions.append(Function(names[0], address, size, tuple(names[1:])))
    # Larger first at equal starts, so the enclosing range wins ties in lookups.
    functions.sort(key=lambda fn: (fn.address, -fn.size))
    return tuple(functions)


def _relocations(section: Section) -> list[tuple[int, int, int, int]]:
    """``(r_offset, type, symbol index, addend)`` of a RELA section."""
    data = section.data()
    usable = len(data) - len(data) % _RELA.size
    return [(off, info & 0xFFFF_FFFF, info >> 32, addend) for off, info, addend in _RELA.iter_unpack(data[:usable])]


def _address_table(
    section: Section | None, relas: list[list[tuple[int, int, int, int]]], dyn_symbols: list[_Symbol]
) -> tuple[int, ...]:
    """Addresses in a table of u64 pointers like ``__mcount_loc``.

    In a non-PIE executable the section holds the absolute addresses.  In a PIE or
    shared object the dynamic relocations that will fill it at load time are the
    truth (the section bytes may be zeros): ``R_X86_64_RELATIVE`` gives the address
    as its addend, ``R_X86_64_64`` as symbol + addend.
    """
    if section is None or section["sh_type"] == "SHT_NOBITS":
        return ()
    start = section["sh_addr"]
    data = section.data()
    usable = len(data) - len(data) % _U64.size
    values = {start + i * _U64.size: v for i, (v,) in enumerate(_U64.iter_unpack(data[:usable]))}
    end = start + usable
    for table in relas:
        for offset, rtype, sym_index, addend in table:
            if not start <= offset < end:
                continue
            if rtype == _R_X86_64_RELATIVE:
                values[offset] = addend
            elif rtype == _R_X86_64_64 and sym_index < len(dyn_symbols):
                values[offset] = dyn_symbols[sym_index].value + addend
    return tuple(sorted({v for v in values.values() if v != 0}))


def _plt_names(
    by_name: dict[str, Section], relas: list[list[tuple[int, int, int, int]]], dyn_symbols: list[_Symbol]
) -> dict[int, str]:
    """Name every PLT stub by the GOT slot its indirect ``jmp`` goes through.

    Decoding the stubs instead of counting entries works for every layout ld
    emits: lazy ``.plt`` (after the PLT0 header), IBT ``.plt.sec`` (the ``.plt``
    entries there only push and jump to PLT0 and get no name), and ``.plt.got``
    (GLOB_DAT slots of functions both called and address-taken).
    """
    ifunc_by_resolver: dict[int, str] = {}
    ifuncs = sorted((s for s in dyn_symbols if s.kind == _STT_GNU_IFUNC and s.name), key=_preference)
    for sym in ifuncs:
        ifunc_by_resolver.setdefault(sym.value, sym.name)  # best-ranked alias first
    slots: dict[int, str] = {}
    for table in relas:
        for offset, rtype, sym_index, addend in table:
            if rtype in (_R_X86_64_JUMP_SLOT, _R_X86_64_GLOB_DAT) and 0 < sym_index < len(dyn_symbols):
                name = dyn_symbols[sym_index].name
                if name:
                    slots[offset] = name
            elif rtype == _R_X86_64_IRELATIVE and addend in ifunc_by_resolver:
                # A local call to an ifunc (e.g. libc calling its own memcpy): the slot
                # is filled by the resolver, which the IFUNC symbol names.
                slots[offset] = ifunc_by_resolver[addend]
    names: dict[int, str] = {}
    instr = Instruction()
    for section_name in _PLT_SECTIONS:
        section = by_name.get(section_name)
        if section is None or section["sh_type"] != "SHT_PROGBITS":
            continue
        data = section.data()
        address = section["sh_addr"]
        entry = section["sh_entsize"] or 16
        for offset in range(0, len(data) - entry + 1, entry):
            decoder = Decoder(64, data[offset : offset + entry], ip=address + offset)
            while decoder.can_decode:
                decoder.decode_out(instr)
                if instr.code == Code.INVALID:
                    break
                if instr.code == Code.JMP_RM64 and instr.is_ip_rel_memory_operand:
                    slot_name = slots.get(instr.ip_rel_memory_address)
                    if slot_name is not None:
                        names[address + offset] = f"{slot_name}@plt"
                    break
    return names


def clear_cache() -> None:
    """Forget every cached image (tests that rewrite a file in place use it)."""
    _cache.clear()


__all__ = [
    "MCOUNT_SECTION",
    "PATCHABLE_SECTION",
    "Function",
    "CodeSection",
    "ElfImage",
    "open_elf",
    "clear_cache",
]
