"""Loading a fix's code and data into a target, from the tool side.

textpoke is the linker here: it never runs dlopen (or anything) inside a
borrowed thread. A fix is a relocatable object (``fix.c`` compiled by gcc, or a
prebuilt ``.o``) or a shared library (``.so``); :func:`read_fix` parses it and
refuses, naming the symbol or section, what it cannot load correctly: not
x86-64 (ElfError), TLS, constructors or destructors, relocation types it does
not handle (FixRefused). :func:`link` then places it at an address the caller
chose and applies every relocation against

1. the fix's own symbols (a fix's ``compute`` calling ``compute`` calls itself),
2. the target's main executable (.symtab: its static functions and globals too;
   a static name defined twice is refused as ambiguous),
3. every other mapped object's exported symbols (libc), in maps order.

An IFUNC (``memcpy``, ``strlen``: the library picks its code at run time by
running a resolver) is resolved to what the program itself uses: its own GOT
slot for that name, read from the target's memory. A fix using an IFUNC the
program never imports is refused (resolving it would mean running code in the
target). An undefined weak symbol found nowhere is 0, as the dynamic linker does.

The image: code part (read and execute in the target: .text, .rodata, the GOT
slots and the far-call stubs textpoke generates), data part (read-write: .data,
.bss, common symbols), both in one region within rel32 reach of the sites
(hotfix/apply.py maps it). A PC-relative reference that does not reach goes
through a stub (``jmp [rip+0]; .quad target``) for calls and jumps; for data it
is refused (the fix is built -fPIC, so external data goes through the GOT).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .._errors import ElfError, FixRefused, SymbolNotFound, UsageError
from ..x86.insn import CALL_OPCODE, CALL_RIP_INDIRECT, JMP_RIP_INDIRECT, NOP1_BYTE, NOP5, SITE_SIZE

PAGE = 4096
#: gcc flags of a fix built from C: position-independent (external data through the
#: GOT, calls PLT32: textpoke reaches anything), no unwind tables (never loaded),
#: and fentry calls recorded in __mcount_loc, which textpoke turns into nop5 sites
#: when it links (as the kernel does with its own): the fix's functions are
#: traceable. (-mnop-mcount, which emits the nop5 itself, refuses -fPIC.)
FIX_CFLAGS = ("-O2", "-fPIC", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fno-stack-protector",
              "-pg", "-mfentry", "-mrecord-mcount")

# ELF constants (System V x86-64 ABI).
_ET_REL, _ET_DYN = 1, 3
_EM_X86_64 = 62
_SHF_WRITE, _SHF_ALLOC, _SHF_EXECINSTR, _SHF_TLS = 0x1, 0x2, 0x4, 0x400
_SHT_NOBITS, _SHT_RELA, _SHT_INIT_ARRAY, _SHT_FINI_ARRAY, _SHT_PREINIT_ARRAY = 8, 4, 14, 15, 16
_SHN_UNDEF, _SHN_ABS, _SHN_COMMON = 0, 0xFFF1, 0xFFF2
_STT_OBJECT, _STT_FUNC, _STT_SECTION, _STT_TLS, _STT_GNU_IFUNC = 1, 2, 3, 6, 10
_STB_LOCAL, _STB_GLOBAL, _STB_WEAK = 0, 1, 2
R_NAMES = {0: "R_X86_64_NONE", 1: "R_X86_64_64", 2: "R_X86_64_PC32", 4: "R_X86_64_PLT32", 9: "R_X86_64_GOTPCREL",
           10: "R_X86_64_32", 11: "R_X86_64_32S", 24: "R_X86_64_PC64", 41: "R_X86_64_GOTPCRELX",
           42: "R_X86_64_REX_GOTPCRELX", 6: "R_X86_64_GLOB_DAT", 7: "R_X86_64_JUMP_SLOT", 8: "R_X86_64_RELATIVE",
           16: "R_X86_64_DTPMOD64", 17: "R_X86_64_DTPOFF64", 18: "R_X86_64_TPOFF64", 19: "R_X86_64_TLSGD",
           20: "R_X86_64_TLSLD", 21: "R_X86_64_DTPOFF32", 22: "R_X86_64_GOTTPOFF", 23: "R_X86_64_TPOFF32",
           37: "R_X86_64_IRELATIVE", 5: "R_X86_64_COPY"}
_R_NONE, _R_64, _R_PC32, _R_PLT32, _R_GOTPCREL, _R_32, _R_32S, _R_PC64 = 0, 1, 2, 4, 9, 10, 11, 24
_R_GOTPCRELX, _R_REX_GOTPCRELX = 41, 42
_R_GLOB_DAT, _R_JUMP_SLOT, _R_RELATIVE = 6, 7, 8
_GOT_RELOCS = {_R_GOTPCREL, _R_GOTPCRELX, _R_REX_GOTPCRELX}
_PC_RELOCS = {_R_PC32, _R_PLT32}
_OBJECT_RELOCS = {_R_NONE, _R_64, _R_PC32, _R_PLT32, _R_32, _R_32S, _R_PC64} | _GOT_RELOCS
_DYNAMIC_RELOCS = {_R_NONE, _R_64, _R_GLOB_DAT, _R_JUMP_SLOT, _R_RELATIVE}
#: Sections never loaded: unwind tables (nobody unwinds through a fix with them:
#: they are not registered), notes, the GNU property note.
_SKIPPED = (".eh_frame", ".note", ".comment", ".gnu.build.attributes")
#: crt boilerplate a gcc -shared library always has in .init_array/.fini_array and
#: DT_INIT/DT_FINI: textpoke does not run them, nor does a fix need them.
_CRT_INIT = frozenset({"frame_dummy", "__do_global_dtors_aux", "_init", "_fini"})
STUB_SIZE = 16  # jmp [rip+0] (6 bytes) + the target (8) + 2 bytes padding
_REACH = 2**31


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int  # in the fix: offset in its section (REL) or link address (DYN)
    size: int
    kind: int  # STT_*
    bind: int  # STB_*
    shndx: int


@dataclass(frozen=True)
class Reloc:
    offset: int  # in the section it patches (REL) or link address (DYN)
    type: int
    symbol: int  # index in the symbol table (0: none)
    addend: int


@dataclass(frozen=True)
class Part:
    """One loaded section (REL) or segment (DYN) of a fix."""

    name: str
    index: int
    data: bytes  # empty for NOBITS
    size: int
    align: int
    writable: bool
    executable: bool
    relocs: tuple[Reloc, ...] = ()


@dataclass(frozen=True)
class FixFile:
    """A parsed fix: what gets loaded, its symbols and relocations."""

    path: str
    shared: bool  # a .so (ET_DYN) rather than a relocatable object
    parts: tuple[Part, ...]
    symbols: tuple[Symbol, ...]
    digest: str  # of the file's bytes: the same fix applied again is recognised
    #: DYN: the link address of the first loaded byte and of the writable segment.
    link_base: int = 0
    data_link: int = 0
    dynamic_relocs: tuple[Reloc, ...] = ()
    mcount: tuple[tuple[int, int], ...] = ()  # (section index, offset) of each fentry site (REL)
    vaddrs: tuple[int, ...] = ()  # DYN: each part's link address

    def defined_functions(self) -> dict[str, Symbol]:
        """Global (or weak) functions the fix defines: the candidates to replace a target's function."""
        return {s.name: s for s in self.symbols if s.kind in (_STT_FUNC,) and s.shndx not in (_SHN_UNDEF, _SHN_ABS)
                and s.bind in (_STB_GLOBAL, _STB_WEAK) and s.name}


@dataclass(frozen=True)
class Image:
    """A fix linked at ``address``: the bytes to write and where its functions are."""

    address: int
    code: bytes  # code part, whole pages
    data: bytes  # data part, whole pages (zeros for .bss)
    functions: dict[str, int]  # global functions of the fix -> target address
    fentry_sites: tuple[int, ...]  # the fix's own nop5 sites (traceable)
    resolved: dict[str, int] = field(default_factory=dict)  # external symbol -> address used

    @property
    def size(self) -> int:
        return len(self.code) + len(self.data)


# ---------------------------------------------------------------------------
# Building and reading
# ---------------------------------------------------------------------------


def build(source: str | os.PathLike[str], *, cflags: Iterable[str] = (), workdir: str | None = None) -> Path:
    """Compile ``fix.c`` with gcc into a relocatable object (``FIX_CFLAGS``)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise UsageError("gcc is needed to build a fix from C", hint="install gcc, or give a prebuilt fix.o / fix.so")
    out_dir = Path(workdir or tempfile.mkdtemp(prefix="textpoke-fix-"))
    out = out_dir / (Path(source).stem + ".o")
    done = subprocess.run([gcc, *FIX_CFLAGS, *cflags, "-c", os.fspath(source), "-o", str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
        raise UsageError(f"gcc could not compile {source}: {first}", hint="fix the compile errors (gcc's output above)")
    return out


def read_fix(path: str | os.PathLike[str], *, shown: str | None = None) -> FixFile:
    """Parse a fix (relocatable object or shared library) and refuse what cannot be loaded.
    ``shown``: the name messages give it (the source a temporary object was built from)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read the fix {path}: {exc.strerror}") from exc
    if raw[:4] != b"\x7fELF":
        raise ElfError(f"{path} is not an ELF object", hint="give fix.c, fix.o or fix.so")
    import io

    try:
        elf = ELFFile(io.BytesIO(raw))
        machine = elf.header["e_machine"]
        if elf.elfclass != 64 or not elf.little_endian or machine != "EM_X86_64":
            raise ElfError(f"{path} is not an x86-64 object ({elf.elfclass}-bit {machine}); nothing was written",
                           hint="build the fix for x86-64, as the target")
        kind = elf.header["e_type"]
        digest = hashlib.sha256(raw).hexdigest()[:32]
        if kind == "ET_REL":
            return _read_rel(shown or path, elf, digest)
        if kind == "ET_DYN":
            return _read_dyn(shown or path, elf, digest)
    except ELFError as exc:
        raise ElfError(f"{path} is a corrupt ELF object: {exc}") from exc
    raise FixRefused(f"{path} is an {kind} file; a fix is a relocatable object (.o) or a shared library (.so)")


def _symbols(section) -> tuple[Symbol, ...]:  # pyelftools SymbolTableSection
    return () if section is None else _symbols_of(section.iter_symbols())


def _symbols_of(raw_symbols) -> tuple[Symbol, ...]:  # pyelftools Symbol objects
    out = []
    for sym in raw_symbols:
        info = sym["st_info"]
        kind = _STT.get(info["type"], -1)
        bind = {"STB_LOCAL": _STB_LOCAL, "STB_GLOBAL": _STB_GLOBAL, "STB_WEAK": _STB_WEAK}.get(info["bind"], -1)
        shndx = sym["st_shndx"]
        shndx = {"SHN_UNDEF": _SHN_UNDEF, "SHN_ABS": _SHN_ABS, "SHN_COMMON": _SHN_COMMON}.get(shndx, shndx)
        out.append(Symbol(sym.name, sym["st_value"], sym["st_size"], kind, bind, shndx))
    return tuple(out)


_STT = {"STT_NOTYPE": 0, "STT_OBJECT": _STT_OBJECT, "STT_FUNC": _STT_FUNC, "STT_SECTION": _STT_SECTION,
        "STT_FILE": 4, "STT_COMMON": 5, "STT_TLS": _STT_TLS, "STT_GNU_IFUNC": _STT_GNU_IFUNC, "STT_LOOS": 10}


def _refuse_tls_and_ifunc(path: str, symbols: Iterable[Symbol]) -> None:
    for sym in symbols:
        if sym.kind == _STT_TLS:
            raise FixRefused(f"{path}: thread-local variable {sym.name or '(unnamed)'} (TLS): textpoke cannot give "
                             "a fix thread-local storage in a running process; nothing was written",
                             hint="make it a plain global (with a lock or atomics if threads share it)")
        if sym.kind == _STT_GNU_IFUNC and sym.shndx != _SHN_UNDEF:
            raise FixRefused(f"{path}: {sym.name} is an IFUNC defined by the fix (its resolver would have to run "
                             "in the target); nothing was written")


def _read_rel(path: str, elf, digest: str) -> FixFile:
    symtab = elf.get_section_by_name(".symtab")
    symbols = _symbols(symtab)
    _refuse_tls_and_ifunc(path, symbols)
    parts: list[Part] = []
    relocs: dict[int, list[Reloc]] = {}
    mcount_relocs: list[Reloc] = []
    for index, section in enumerate(elf.iter_sections()):
        h = section.header
        stype = h["sh_type"]
        if stype == "SHT_RELA":
            target = h["sh_info"]
            target_name = elf.get_section(target).name
            rows = [Reloc(r["r_offset"], r["r_info_type"], r["r_info_sym"], r["r_addend"])
                    for r in section.iter_relocations()]
            if target_name == "__mcount_loc":
                mcount_relocs = rows
            relocs.setdefault(target, []).extend(rows)
        elif stype == "SHT_REL":
            raise FixRefused(f"{path}: section {section.name} holds REL relocations; x86-64 objects use RELA")
    for index, section in enumerate(elf.iter_sections()):
        h = section.header
        flags, name = h["sh_flags"], section.name
        if name in (".init_array", ".fini_array", ".preinit_array", ".ctors", ".dtors") or \
                h["sh_type"] in ("SHT_INIT_ARRAY", "SHT_FINI_ARRAY", "SHT_PREINIT_ARRAY") or \
                name.startswith((".init_array.", ".fini_array.", ".ctors.", ".dtors.")):
            who = _named_targets(symbols, relocs.get(index, ()))
            raise FixRefused(f"{path}: a constructor or destructor ({name}: {who}); textpoke does not run code "
                             "in the target; nothing was written",
                             hint="do the initialisation in the fixed function itself (once, with a flag)")
        if name in (".init", ".fini"):
            raise FixRefused(f"{path}: section {name} (start-up code); textpoke does not run code in the target")
        if not flags & _SHF_ALLOC or name.startswith(_SKIPPED) or name == "__mcount_loc":
            continue
        if flags & _SHF_TLS:
            raise FixRefused(f"{path}: thread-local section {name} (TLS); nothing was written",
                             hint="make the variable a plain global")
        nobits = h["sh_type"] == "SHT_NOBITS"
        parts.append(Part(name, index, b"" if nobits else section.data(), h["sh_size"], max(1, h["sh_addralign"]),
                          bool(flags & _SHF_WRITE), bool(flags & _SHF_EXECINSTR), tuple(relocs.get(index, ()))))
    mcount = []
    for reloc in mcount_relocs:
        sym = symbols[reloc.symbol]
        mcount.append((sym.shndx, (sym.value if sym.kind != _STT_SECTION else 0) + reloc.addend))
    for part in parts:
        for reloc in part.relocs:
            if reloc.type not in _OBJECT_RELOCS:
                sym = symbols[reloc.symbol].name if reloc.symbol else ""
                raise FixRefused(f"{path}: relocation {R_NAMES.get(reloc.type, reloc.type)} at {part.name}+"
                                 f"{reloc.offset:#x}{' (' + sym + ')' if sym else ''} is not one textpoke handles; "
                                 "nothing was written", hint="build with gcc -O2 -fPIC -c (no TLS, small code model)")
    return FixFile(path, False, tuple(parts), symbols, digest, mcount=tuple(mcount))


def _named_targets(symbols: tuple[Symbol, ...], relocs: Iterable[Reloc]) -> str:
    names = []
    for reloc in relocs:
        sym = symbols[reloc.symbol] if reloc.symbol < len(symbols) else None
        if sym is None:
            continue
        if sym.kind == _STT_SECTION:
            hit = [s.name for s in symbols if s.shndx == sym.shndx and s.kind == _STT_FUNC and s.value == reloc.addend]
            names += hit or [f"{reloc.addend:#x}"]
        else:
            names.append(sym.name)
    return ", ".join(names) or "?"


def _read_dyn(path: str, elf, digest: str) -> FixFile:
    if any(seg["p_type"] == "PT_TLS" for seg in elf.iter_segments()):
        raise FixRefused(f"{path}: the library has thread-local storage (PT_TLS); nothing was written",
                         hint="make the variables plain globals")
    dynsym = elf.get_section_by_name(".dynsym")
    symtab = elf.get_section_by_name(".symtab")
    symbols = _symbols(dynsym)
    _refuse_tls_and_ifunc(path, symbols)
    every = symbols + _symbols(symtab)
    loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
    if not loads:
        raise FixRefused(f"{path}: no loadable segment")
    writable = [seg for seg in loads if seg["p_flags"] & 2]
    if len(writable) > 1:
        raise FixRefused(f"{path}: {len(writable)} writable segments; textpoke loads libraries with one")
    link_base = loads[0]["p_vaddr"] & ~(PAGE - 1)
    data_link = (writable[0]["p_vaddr"] & ~(PAGE - 1)) if writable else _page_up(max(s["p_vaddr"] + s["p_memsz"]
                                                                                   for s in loads))
    for seg in loads:
        if seg is not (writable[0] if writable else None) and seg["p_vaddr"] + seg["p_memsz"] > data_link:
            raise FixRefused(f"{path}: a read-only segment shares a page with the writable one; "
                             "textpoke loads code and data in separate pages", hint="link with -z separate-code")
    # Constructors beyond crt boilerplate: DT_INIT_ARRAY entries naming another function.
    by_address = {s.value: s.name for s in every if s.kind == _STT_FUNC and s.value}
    for section in elf.iter_sections():
        if section.header["sh_type"] in ("SHT_INIT_ARRAY", "SHT_FINI_ARRAY", "SHT_PREINIT_ARRAY"):
            data = section.data()
            for (addr,) in struct.iter_unpack("<Q", data[: len(data) - len(data) % 8]):
                name = by_address.get(addr)
                if addr and addr != 0xFFFFFFFFFFFFFFFF and name not in _CRT_INIT:
                    raise FixRefused(f"{path}: a constructor or destructor ({section.name}: {name or hex(addr)}); "
                                     "textpoke does not run code in the target; nothing was written",
                                     hint="do the initialisation in the fixed function itself (once, with a flag)")
    dynamic_relocs: list[Reloc] = []
    for section in elf.iter_sections():
        if section.header["sh_type"] == "SHT_RELA" and section.header["sh_flags"] & _SHF_ALLOC:
            for r in section.iter_relocations():
                reloc = Reloc(r["r_offset"], r["r_info_type"], r["r_info_sym"], r["r_addend"])
                if reloc.type not in _DYNAMIC_RELOCS:
                    sym = symbols[reloc.symbol].name if reloc.symbol else ""
                    raise FixRefused(f"{path}: dynamic relocation {R_NAMES.get(reloc.type, reloc.type)} at "
                                     f"{reloc.offset:#x}{' (' + sym + ')' if sym else ''} is not one textpoke "
                                     "handles; nothing was written")
                dynamic_relocs.append(reloc)
    parts = []
    for k, seg in enumerate(loads):
        data = seg.data()
        parts.append(Part(f"LOAD[{k}]", k, data, seg["p_memsz"], PAGE, bool(seg["p_flags"] & 2),
                          bool(seg["p_flags"] & 1)))
    vaddrs = tuple(seg["p_vaddr"] for seg in loads)
    return FixFile(path, True, tuple(parts), symbols, digest, link_base=link_base, data_link=data_link,
                   dynamic_relocs=tuple(dynamic_relocs), vaddrs=vaddrs)


def _page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# ---------------------------------------------------------------------------
# The target's symbols
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSymbol:
    address: int
    kind: int
    origin: str  # the object that defines it


class TargetSymbols:
    """Names of the target: its main executable's symbol table first (static
    functions and globals too), then every mapped object's exported symbols."""

    def __init__(self, pid: int) -> None:
        from ..sites.process import _file_objects, mapped_object
        from ..target.maps import read_maps

        self.pid = pid
        self._exe: dict[str, list[TargetSymbol]] = {}
        self._libs: dict[str, TargetSymbol | None] = {}  # looked up so far (None: in no library)
        self._got: dict[str, int] = {}  # name -> runtime GOT slot of the main executable
        exe, _ = mapped_object(pid)
        self.exe_path = exe.path
        self.exe_base = exe.base
        self._read_exe(exe.elf_path, exe.path, exe.base)
        # Libraries: looked up by name through their hash tables, on first use (libc's
        # symbol table read whole costs a second of Python).
        self._objects: list[tuple[str, str, int]] = []
        self._opened: dict[str, object] = {}
        for name in _file_objects(read_maps(pid)):
            if name == exe.path:
                continue
            try:
                obj, _ = mapped_object(pid, path=name)
            except (ElfError, UsageError, OSError):
                continue  # not an ELF object (a data file mapped): no symbols
            self._objects.append((obj.elf_path, obj.path, obj.base))

    @staticmethod
    def _open(elf_path: str, path: str):  # -> ELFFile | None, over the file's bytes (no descriptor kept)
        import io

        from elftools.elf.elffile import ELFFile

        for candidate in (elf_path, path):
            try:
                with open(candidate, "rb") as f:
                    return ELFFile(io.BytesIO(f.read()))
            except OSError:
                continue
            except Exception:  # not an ELF file: no symbols
                return None
        return None

    def _read_exe(self, elf_path: str, path: str, base: int) -> None:
        from elftools.common.exceptions import ELFError

        elf = self._open(elf_path, path)
        if elf is None:
            return
        try:
            for table in (elf.get_section_by_name(".symtab"), elf.get_section_by_name(".dynsym")):
                for sym in _symbols(table):
                    if not sym.name or sym.shndx == _SHN_UNDEF or sym.kind not in (
                            0, _STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC):
                        continue
                    value = sym.value + (base if sym.shndx != _SHN_ABS else 0)
                    found = self._exe.setdefault(sym.name, [])
                    if all(e.address != value for e in found):
                        found.append(TargetSymbol(value, sym.kind, path if sym.bind != _STB_LOCAL else ""))
            self._read_got(elf, base)
        except (ELFError, ValueError, struct.error):
            return

    def _library_symbol(self, name: str) -> TargetSymbol | None:
        """The first mapped library (maps order) exporting ``name``."""
        if name in self._libs:
            return self._libs[name]
        found = None
        for elf_path, path, base in self._objects:
            if path not in self._opened:
                self._opened[path] = self._open(elf_path, path)
            elf = self._opened[path]
            if elf is None:
                continue
            sym = _lookup(elf, name)
            if sym is not None:
                found = TargetSymbol(sym.value + (base if sym.shndx != _SHN_ABS else 0), sym.kind, path)
                break
        self._libs[name] = found
        return found

    def _read_got(self, elf, base: int) -> None:
        """The executable's GOT slots by name (JUMP_SLOT, GLOB_DAT): an IFUNC's choice is there."""
        dynsym = elf.get_section_by_name(".dynsym")
        if dynsym is None:
            return
        names = [s.name for s in dynsym.iter_symbols()]
        for section in elf.iter_sections():
            if section.header["sh_type"] == "SHT_RELA" and section.name in (".rela.plt", ".rela.dyn"):
                for r in section.iter_relocations():
                    if r["r_info_type"] in (_R_JUMP_SLOT, _R_GLOB_DAT) and r["r_info_sym"] < len(names):
                        self._got.setdefault(names[r["r_info_sym"]], r["r_offset"] + base)

    def origin_of(self, name: str) -> str:
        """Where ``name`` resolves: the program (static or global) or a library's file name."""
        found = self._exe.get(name)
        if found:
            return "program" if found[0].origin else "program, static"
        entry = self._library_symbol(name)
        return os.path.basename(entry.origin) if entry is not None else "weak, 0"

    def function(self, name: str) -> int | None:
        """Address of a function of the main executable (for the sites to redirect)."""
        found = [e for e in self._exe.get(name, ()) if e.kind == _STT_FUNC]
        if len(found) > 1:
            raise SymbolNotFound(f"{name} names {len(found)} functions of {self.exe_path} (static functions of "
                                 "different files); nothing was written", hint="textpoke cannot tell which to replace")
        return found[0].address if found else None

    def resolve(self, name: str, read: Callable[[int], int]) -> int | None:
        """Address of ``name`` for the fix's relocations; ``read(addr)`` reads a u64 of the target."""
        found = self._exe.get(name, [])
        glob = [e for e in found if e.origin]
        pick = glob or found
        if len(pick) > 1:
            raise SymbolNotFound(f"{name} names {len(pick)} different symbols of {self.exe_path} (static symbols of "
                                 "different files); nothing was written",
                                 hint="give the fix's symbol a name that is unique in the program")
        if pick:
            entry = pick[0]
        else:
            entry = self._library_symbol(name)
            if entry is None:
                return None
        if entry.kind == _STT_GNU_IFUNC:
            slot = self._got.get(name)
            if slot is None:
                raise FixRefused(f"{name} is an IFUNC of {entry.origin} (its code is chosen at run time) and "
                                 f"{os.path.basename(self.exe_path)} does not use it; nothing was written",
                                 hint="call a function the program uses, or one that is not an IFUNC")
            return read(slot)
        return entry.address


def _lookup(elf, name: str) -> Symbol | None:
    """An exported (defined, global or weak) symbol of a library, by its hash table."""
    from elftools.elf.hash import ELFHashSection, GNUHashSection

    table = next((s for s in elf.iter_sections() if isinstance(s, (GNUHashSection, ELFHashSection))), None)
    if table is not None:
        candidates = [table.get_symbol(name)]
    else:
        dynsym = elf.get_section_by_name(".dynsym")
        candidates = dynsym.get_symbol_by_name(name) or [] if dynsym is not None else []
    for raw in candidates:
        if raw is None:
            continue
        (sym,) = _symbols_of([raw])
        if sym.shndx not in (_SHN_UNDEF,) and sym.bind in (_STB_GLOBAL, _STB_WEAK) and sym.kind in (
                0, _STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC):
            return sym
    return None


# ---------------------------------------------------------------------------
# Placing and relocating
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each part goes, relative to the image's start; sizes in whole pages."""

    offsets: dict[int, int]  # part index -> offset in the image
    got: dict[str, int]  # GOT slot offsets (code part) by symbol key
    stubs: dict[str, int]  # stub offsets (code part) by symbol key
    commons: dict[str, int]  # common symbols -> offset (data part)
    code_size: int
    data_size: int


def layout(fix: FixFile) -> Layout:
    """Offsets of every part, GOT slot and stub; code first (read + execute), then data."""
    if fix.shared:
        offsets = {part.index: vaddr - fix.link_base for part, vaddr in zip(fix.parts, fix.vaddrs)}
        end = max(vaddr - fix.link_base + part.size for part, vaddr in zip(fix.parts, fix.vaddrs))
        code_size = fix.data_link - fix.link_base
        return Layout(offsets, {}, {}, {}, max(code_size, PAGE), max(_page_up(end) - code_size, PAGE))
    offsets: dict[int, int] = {}
    at = 0
    for part in fix.parts:
        if not part.writable:
            at = _align(at, part.align)
            offsets[part.index] = at
            at += part.size
    got: dict[str, int] = {}
    stubs: dict[str, int] = {}
    at = _align(at, 8)
    for part in fix.parts:
        for reloc in part.relocs:
            key = _key(fix, reloc)
            if reloc.type in _GOT_RELOCS and key not in got:
                got[key] = at
                at += 8
    at = _align(at, STUB_SIZE)
    for part in fix.parts:
        for reloc in part.relocs:
            sym = fix.symbols[reloc.symbol] if reloc.symbol else None
            if reloc.type in _PC_RELOCS and sym is not None and sym.shndx == _SHN_UNDEF:
                key = _key(fix, reloc)
                if key not in stubs:
                    stubs[key] = at
                    at += STUB_SIZE
    code_size = max(_page_up(at), PAGE)
    at = code_size
    for part in fix.parts:
        if part.writable:
            at = _align(at, part.align)
            offsets[part.index] = at
            at += part.size
    commons: dict[str, int] = {}
    for sym in fix.symbols:
        if sym.shndx == _SHN_COMMON and sym.name not in commons:
            at = _align(at, max(1, sym.value))
            commons[sym.name] = at
            at += sym.size
    return Layout(offsets, got, stubs, commons, code_size, max(_page_up(at) - code_size, PAGE))


def _key(fix: FixFile, reloc: Reloc) -> str:
    sym = fix.symbols[reloc.symbol] if reloc.symbol else None
    if sym is None:
        return "#0"
    return sym.name if sym.shndx == _SHN_UNDEF or sym.bind != _STB_LOCAL else f"#{reloc.symbol}"


def link(fix: FixFile, where: Layout, address: int, *, target: TargetSymbols,
         read: Callable[[int], int]) -> Image:
    """The fix's bytes placed at ``address`` with every relocation applied.

    Steps: copy each part to its offset; find every symbol a relocation names
    (the fix's own, then the target's: ``TargetSymbols.resolve``; unresolved:
    SymbolNotFound naming it, weak undefined: 0); fill GOT slots and stubs;
    apply each relocation, refusing one whose value does not fit its field."""
    image = bytearray(where.code_size + where.data_size)
    for part in fix.parts:
        at = where.offsets[part.index]
        image[at : at + len(part.data)] = part.data
    resolved: dict[str, int] = {}
    # Recorded fentry calls become nop5 sites (their __fentry__ relocation is not applied).
    fentry_at: set[int] = set()
    fentry_sites: list[int] = []
    for shndx, offset in fix.mcount:
        if shndx in where.offsets:
            at = where.offsets[shndx] + offset
            if image[at] == CALL_OPCODE:  # call __fentry__@PLT
                image[at : at + SITE_SIZE] = NOP5
                fentry_at.add(at + 1)
                fentry_sites.append(address + at)
            elif image[at : at + 2] == CALL_RIP_INDIRECT:  # call *__fentry__@GOTPCREL(%rip): 6 bytes
                image[at : at + SITE_SIZE + 1] = NOP5 + bytes([NOP1_BYTE])
                fentry_at.add(at + 2)
                fentry_sites.append(address + at)

    def symbol_address(index: int) -> int:
        sym = fix.symbols[index]
        if sym.shndx == _SHN_UNDEF:
            if sym.name in resolved:
                return resolved[sym.name]
            value = target.resolve(sym.name, read)
            if value is None:
                if sym.bind == _STB_WEAK:
                    value = 0
                else:
                    raise SymbolNotFound(f"{os.path.basename(fix.path)}: symbol {sym.name} is not defined by the fix, "
                                         f"the program or any library it has loaded; nothing was written",
                                         hint="declare only what the program or its libraries define")
            resolved[sym.name] = value
            return value
        if sym.shndx == _SHN_ABS:
            return sym.value
        if sym.shndx == _SHN_COMMON:
            return address + where.commons[sym.name]
        if fix.shared:
            return address + sym.value - fix.link_base
        if sym.shndx not in where.offsets:
            raise FixRefused(f"{os.path.basename(fix.path)}: symbol {sym.name or '#' + str(index)} is in a section "
                             "textpoke does not load; nothing was written")
        return address + where.offsets[sym.shndx] + (0 if sym.kind == _STT_SECTION else sym.value)

    if fix.shared:
        for reloc in fix.dynamic_relocs:
            at = reloc.offset - fix.link_base
            if reloc.type == _R_RELATIVE:
                struct.pack_into("<Q", image, at, (address - fix.link_base + reloc.addend) & (2**64 - 1))
            elif reloc.type in (_R_GLOB_DAT, _R_JUMP_SLOT):
                struct.pack_into("<Q", image, at, symbol_address(reloc.symbol))
            elif reloc.type == _R_64:
                struct.pack_into("<Q", image, at, (symbol_address(reloc.symbol) + reloc.addend) & (2**64 - 1))
    else:
        for part in fix.parts:
            base = where.offsets[part.index]
            for reloc in part.relocs:
                at = base + reloc.offset
                if reloc.type == _R_NONE or at in fentry_at:
                    continue
                place = address + at
                value = symbol_address(reloc.symbol) if reloc.symbol else 0
                name = fix.symbols[reloc.symbol].name if reloc.symbol else ""
                if reloc.type == _R_64:
                    struct.pack_into("<Q", image, at, (value + reloc.addend) & (2**64 - 1))
                elif reloc.type == _R_PC64:
                    struct.pack_into("<q", image, at, value + reloc.addend - place)
                elif reloc.type in _PC_RELOCS:
                    delta = value + reloc.addend - place
                    if not -_REACH <= delta < _REACH:
                        key = _key(fix, reloc)
                        if key not in where.stubs:
                            raise FixRefused(f"{os.path.basename(fix.path)}: {name} at {value:#x} is out of reach "
                                             f"(rel32) of the fix's code at {place:#x}; nothing was written")
                        stub = where.stubs[key]
                        image[stub : stub + 6] = JMP_RIP_INDIRECT + b"\0\0\0\0"
                        struct.pack_into("<Q", image, stub + 6, value)
                        delta = address + stub + reloc.addend - place
                    struct.pack_into("<i", image, at, delta)
                elif reloc.type in _GOT_RELOCS:
                    slot = where.got[_key(fix, reloc)]
                    struct.pack_into("<Q", image, slot, value)
                    struct.pack_into("<i", image, at, address + slot + reloc.addend - place)
                elif reloc.type in (_R_32, _R_32S):
                    result = value + reloc.addend
                    ok = 0 <= result < 2**32 if reloc.type == _R_32 else -(2**31) <= result < 2**31
                    if not ok:
                        raise FixRefused(f"{os.path.basename(fix.path)}: {R_NAMES[reloc.type]} to {name or '?'} "
                                         f"({result:#x}) does not fit 32 bits where the fix is loaded; nothing was "
                                         "written", hint="build the fix with -fPIC")
                    struct.pack_into("<I" if reloc.type == _R_32 else "<i", image, at, result)
    functions = {}
    for sym in fix.symbols:
        if sym.kind == _STT_FUNC and sym.shndx not in (_SHN_UNDEF, _SHN_ABS) and sym.name:
            if sym.bind != _STB_LOCAL or sym.name not in functions:
                functions[sym.name] = (address + sym.value - fix.link_base) if fix.shared else \
                    address + where.offsets[sym.shndx] + sym.value
    fentry = tuple(sorted(fentry_sites))
    return Image(address, bytes(image[: where.code_size]), bytes(image[where.code_size :]), functions, fentry,
                 resolved)


__all__ = ["FIX_CFLAGS", "FixFile", "Image", "Layout", "TargetSymbols", "build", "layout", "link", "read_fix"]
