"""A minimal reader of x86-64 ELF files: headers, sections, segments, notes.

Only what the sites stage needs, read with :mod:`struct` and ``os.pread`` so
that opening a large binary costs a few header reads: section contents are
read when asked for, once.  Large tables are handed on as raw bytes for numpy.
Every offset and size read from the file is checked against the file, so a
corrupt file is refused with :class:`~textpoke.ElfError`, never a traceback.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import BinaryIO

from .._errors import ElfError

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_CHDR = struct.Struct("<IIQQ")  # Elf64_Chdr: type, reserved, size, addralign

ET_EXEC, ET_DYN = 2, 3
_ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
EM_X86_64 = 62

SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_RELA = 4
SHT_DYNAMIC = 6
SHT_NOTE = 7
SHT_NOBITS = 8
SHT_DYNSYM = 11
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
SHF_COMPRESSED = 0x800
_SHN_XINDEX = 0xFFFF
_ELFCOMPRESS_ZLIB = 1

PT_LOAD = 1
PT_DYNAMIC = 2
PT_NOTE = 4
_NT_GNU_BUILD_ID = 3
_PAGE = 4096


@dataclass(frozen=True)
class Section:
    """One section header (``name`` resolved)."""

    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    entsize: int

    @property
    def executable(self) -> bool:
        return bool(self.flags & SHF_ALLOC and self.flags & SHF_EXECINSTR)

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True)
class Segment:
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int


class ElfFile:
    """Headers of one ELF file; section data on demand (``os.pread``).

    Use as a context manager (or :meth:`close`): it owns the file's descriptor.
    """

    def __init__(self, path: str, f: BinaryIO, *, image: bytes | None = None) -> None:
        self.path = path
        self._f = f
        #: The whole file, when it came from memory (MiniDebugInfo) rather than a file.
        self._image = image
        self._size = len(image) if image is not None else os.fstat(f.fileno()).st_size
        self._parse()

    @classmethod
    def from_bytes(cls, path: str, data: bytes) -> ElfFile:
        return cls(path, None, image=data)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()

    def __enter__(self) -> ElfFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw reads ---------------------------------------------------------------

    def _pread(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > self._size:
            raise ElfError(
                f"{self.path} is a corrupt or truncated ELF file: {what} "
                f"({size} bytes at offset {offset:#x}) lies past its end ({self._size:#x} bytes)",
                hint="textpoke reads x86-64 ELF executables and shared objects",
            )
        if self._image is not None:
            return self._image[offset : offset + size]
        return os.pread(self._f.fileno(), size, offset)

    # -- headers -----------------------------------------------------------------

    def _parse(self) -> None:
        head = self._pread(0, min(self._size, _EHDR.size), "the ELF header") if self._size else b""
        _check_ident(self.path, head)
        if len(head) < _EHDR.size:
            raise ElfError(f"{self.path} is a truncated ELF file")
        (_, e_type, _machine, _version, _entry, phoff, shoff, _flags, _ehsize,
         phentsize, phnum, shentsize, shnum, shstrndx) = _EHDR.unpack(head)
        self.e_type = e_type
        self.type_name = _ET_NAMES.get(e_type, f"type {e_type}")
        self.segments = self._segments(phoff, phentsize, phnum)
        self.sections = self._sections(shoff, shentsize, shnum, shstrndx)
        self.by_name = {}
        for section in self.sections:
            self.by_name.setdefault(section.name, section)

    def _segments(self, phoff: int, phentsize: int, phnum: int) -> tuple[Segment, ...]:
        if phnum == 0 or phoff == 0:
            return ()
        if phentsize != _PHDR.size:
            raise ElfError(f"{self.path} is a corrupt ELF file: program header size {phentsize}")
        data = self._pread(phoff, phnum * _PHDR.size, "the program headers")
        return tuple(
            Segment(p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz)
            for p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, _align in _PHDR.iter_unpack(data)
        )

    def _sections(self, shoff: int, shentsize: int, shnum: int, shstrndx: int) -> tuple[Section, ...]:
        if shoff == 0:
            return ()
        if shentsize != _SHDR.size:
            raise ElfError(f"{self.path} is a corrupt ELF file: section header size {shentsize}")
        first = _SHDR.unpack(self._pread(shoff, _SHDR.size, "the section headers"))
        if shnum == 0:
            shnum = first[5]  # more than 0xff00 sections: the count is in section 0's sh_size
        if shstrndx == _SHN_XINDEX:
            shstrndx = first[6]
        data = self._pread(shoff, shnum * _SHDR.size, "the section headers")
        raw = list(_SHDR.iter_unpack(data))
        names = b""
        if 0 < shstrndx < len(raw):
            _n, _t, _f, _a, offset, size, *_rest = raw[shstrndx]
            names = self._pread(offset, size, "the section name table")
        sections = []
        for index, (name_off, sh_type, flags, addr, offset, size, link, info, _align, entsize) in enumerate(raw):
            end = names.find(b"\0", name_off)
            name = names[name_off:end].decode("utf-8", "replace") if end > name_off else ""
            sections.append(Section(index, name, sh_type, flags, addr, offset, size, link, info, entsize))
        return tuple(sections)

    # -- contents ----------------------------------------------------------------

    def data(self, section: Section) -> bytes:
        """A section's contents (decompressed if SHF_COMPRESSED; ``b""`` for NOBITS)."""
        if section.type == SHT_NOBITS or section.size == 0:
            return b""
        data = self._pread(section.offset, section.size, f"section {section.name}")
        if section.flags & SHF_COMPRESSED:
            if len(data) < _CHDR.size:
                raise ElfError(f"{self.path} is a corrupt ELF file: compressed {section.name} too short")
            ch_type, _reserved, ch_size, _align = _CHDR.unpack_from(data)
            if ch_type != _ELFCOMPRESS_ZLIB:
                raise ElfError(f"{self.path}: section {section.name} uses compression type {ch_type}")
            try:
                data = zlib.decompress(data[_CHDR.size :])
            except zlib.error as exc:
                raise ElfError(f"{self.path} is a corrupt ELF file: {section.name}: {exc}") from exc
            if len(data) != ch_size:
                raise ElfError(f"{self.path} is a corrupt ELF file: {section.name} decompresses to "
                               f"{len(data)} bytes, not {ch_size}")
        return data

    def check_inside(self, section: Section) -> None:
        """Refuse a section whose contents would lie past the end of the file."""
        if section.type != SHT_NOBITS and (section.offset + section.size > self._size
                                           or section.addr + section.size >= 1 << 64):
            raise ElfError(
                f"{self.path} is a corrupt or truncated ELF file: section {section.name or section.index} "
                f"({section.size} bytes at offset {section.offset:#x}) lies past its end",
                hint="textpoke reads x86-64 ELF executables and shared objects",
            )

    def section(self, name: str) -> Section | None:
        return self.by_name.get(name)

    def linked(self, section: Section) -> Section | None:
        """The section ``section.sh_link`` names (a symbol table's string table)."""
        return self.sections[section.link] if 0 < section.link < len(self.sections) else None

    @cached_property
    def build_id(self) -> bytes | None:
        """The GNU build-id note's bytes, or None."""
        for section in self.sections:
            if section.type == SHT_NOTE and section.size:
                found = _build_id(self.data(section))
                if found is not None:
                    return found
        for segment in self.segments:
            if segment.type == PT_NOTE and segment.filesz:
                found = _build_id(self._pread(segment.offset, segment.filesz, "a note segment"))
                if found is not None:
                    return found
        return None

    @cached_property
    def link_vaddr(self) -> int:
        """Page-rounded ``p_vaddr`` of the PT_LOAD mapping file offset 0 (for the load bias)."""
        for segment in self.segments:
            if segment.type == PT_LOAD and segment.offset < _PAGE:
                return segment.vaddr & ~(_PAGE - 1)
        return 0

    def dynamic_strings(self, tag: int) -> list[str]:
        """String values of ``.dynamic`` entries with ``tag`` (DT_NEEDED = 1, DT_RUNPATH = 29...)."""
        dynamic = next((s for s in self.sections if s.type == SHT_DYNAMIC), None)
        if dynamic is None:
            return []
        strtab = self.linked(dynamic)
        if strtab is None:
            return []
        strings = self.data(strtab)
        out = []
        for d_tag, value in struct.iter_unpack("<qQ", self.data(dynamic)[: dynamic.size // 16 * 16]):
            if d_tag == 0:
                break
            if d_tag == tag and value < len(strings):
                out.append(strings[value : strings.find(b"\0", value)].decode("utf-8", "replace"))
        return out


def _build_id(notes: bytes) -> bytes | None:
    offset = 0
    while offset + 12 <= len(notes):
        namesz, descsz, n_type = struct.unpack_from("<III", notes, offset)
        name_at = offset + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if end > len(notes):
            return None
        if n_type == _NT_GNU_BUILD_ID and notes[name_at : name_at + namesz] == b"GNU\0":
            return notes[desc_at : desc_at + descsz]
        offset = end
    return None


def _check_ident(path: str, ident: bytes) -> None:
    """Refuse non-ELF and non-x86-64 files with a precise message."""
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
    if machine != EM_X86_64:
        raise ElfError(
            f"{path} is an ELF file for machine {machine}, not x86-64 (EM_X86_64 = 62)",
            hint="textpoke patches x86-64 code only",
        )


def open_file(path: str) -> ElfFile:
    """Open ``path`` as an ELF file; OS errors become :class:`ElfError`."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - owned by the ElfFile
    except FileNotFoundError as exc:
        raise ElfError(f"no such file: {path}", hint="give a path to an ELF binary or a pid") from exc
    except IsADirectoryError as exc:
        raise ElfError(f"{path} is a directory, not an ELF binary") from exc
    except PermissionError as exc:
        raise ElfError(f"cannot read {path}: permission denied", hint="check the file's permissions") from exc
    except OSError as exc:
        raise ElfError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return ElfFile(path, f)
    except BaseException:
        f.close()
        raise


__all__ = ["ElfFile", "Section", "Segment", "open_file"]
