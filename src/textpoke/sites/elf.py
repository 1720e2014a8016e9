"""What an ELF file says: its functions, recorded fentry locations, PLT stubs, code.

Functions come from every source a binary as shipped has, best first:

1. ``.symtab`` (an unstripped build), else the symbol table of its separate
   debug file (found by build-id or ``.gnu_debuglink``, see
   :mod:`.debuginfo`), else ``.gnu_debugdata`` (MiniDebugInfo) together with
   ``.dynsym`` (the exported functions);
2. ``.eh_frame``: every FDE (see :mod:`.ehframe`) that starts where no
   symbol does and lies inside no named function becomes ``sub_<address>``
   (the link-time address in hex), so a stripped binary still has every
   function gcc or clang compiled, with exact bounds.

PLT stubs are named ``malloc@plt`` from the relocation of the GOT slot each
stub jumps through.  Large tables are read as numpy arrays straight from the
section bytes (no object per symbol); per-function Python objects
(:attr:`ElfImage.functions`) are built only when asked for.  Results are
cached per file identity (device, inode, size, mtime), so a file reached
through two paths (``/proc/PID/map_files/...`` and its real path) is read once.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .._errors import ElfError
from .debuginfo import find_debug_file, mini_debuginfo
from .ehframe import EhFrameError, fde_ranges
from .elffile import (
    ET_DYN,
    ET_EXEC,
    SHT_DYNSYM,
    SHT_NOBITS,
    SHT_SYMTAB,
    ElfFile,
    Section,
    open_file,
)
from .functions import Function, FunctionTable, Named, Origin, merge, preference, search
from .names import demangle_all, short_names
from .tables import PLT_SECTIONS, address_table, got_names, plt_names, relocations

_STT_FUNC = 2
_STT_GNU_IFUNC = 10
_SHN_LORESERVE = 0xFF00

SYM_DTYPE = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                      ("value", "<u8"), ("size", "<u8")])

#: Sections whose entries record fentry locations (one absolute address each).
MCOUNT_SECTION = "__mcount_loc"
PATCHABLE_SECTION = "__patchable_function_entries"
_CACHE_SIZE = 128


@dataclass(frozen=True)
class CodeSection:
    """An executable section's link-time address and contents."""

    name: str
    address: int
    data: bytes

    @property
    def end(self) -> int:
        return self.address + len(self.data)


class _Core:
    """Everything read from one file; shared by every :class:`ElfImage` of that file."""

    def __init__(self, *, identity: tuple[int, int, int, int], file_path: str, e_type: int,
                 stripped: bool, symbol_source: str, debug_file: str | None, table: FunctionTable,
                 fdes: int, mcount: np.ndarray, has_mcount: bool, patchable: np.ndarray,
                 plt_symbols: dict[int, str], plt_sizes: dict[int, int], plt_ranges: tuple[tuple[int, int], ...],
                 exec_sections: tuple[Section, ...], link_vaddr: int, build_id: bytes | None,
                 needed: tuple[str, ...], runpath: tuple[str, ...], got_names: dict[int, str],
                 imports: frozenset[str]) -> None:
        self.identity = identity
        self.file_path = file_path
        #: Every path this file was opened by (for reading its code later).
        self.paths = [file_path]
        self.e_type = e_type
        self.stripped = stripped
        self.symbol_source = symbol_source
        self.debug_file = debug_file
        self.table = table
        self.fdes = fdes
        self.mcount = mcount
        self.has_mcount = has_mcount
        self.patchable = patchable
        # Stub -> "symbol@plt" as in the file; shown demangled, matched under every name.
        symbols = list(plt_symbols.values())
        shown = demangle_all([name.removesuffix("@plt") for name in symbols])
        self.plt = {stub: f"{name}@plt" for stub, name in zip(plt_symbols, shown)}
        self.plt_names: dict[int, tuple[str, ...]] = {}
        for (stub, raw), name in zip(plt_symbols.items(), shown):
            bare = raw.removesuffix("@plt")
            found = [f"{name}@plt", name]
            if bare != name:
                found += [*short_names(name), raw, bare]
            self.plt_names[stub] = tuple(dict.fromkeys(found))
        self.plt_sizes = plt_sizes
        self.plt_ranges = plt_ranges
        self.exec_sections = exec_sections
        self.link_vaddr = link_vaddr
        self.build_id = build_id
        self.needed = needed
        self.runpath = runpath
        self.got_names = got_names
        self.imports = imports

    @cached_property
    def code(self) -> tuple[CodeSection, ...]:
        """Executable sections' bytes, read on first use through any path this file was
        opened by (a map_files link of a process that has exited since is skipped)."""
        failure: OSError | None = None
        for path in reversed(self.paths):
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self.identity:
                        continue  # replaced since: not the file that was read
                    code = tuple(
                        CodeSection(s.name, s.addr, os.pread(f.fileno(), s.size, s.offset))
                        for s in self.exec_sections
                    )
            except OSError as exc:
                failure = exc
                continue
            if any(len(c.data) != s.size for c, s in zip(code, self.exec_sections)):
                raise ElfError(f"{path} is a truncated ELF file")
            return code
        reason = f": {failure.strerror or failure}" if failure is not None else " (it changed since it was read)"
        raise ElfError(f"cannot read the code of {self.file_path}{reason}", hint="run the command again")


class ElfImage:
    """One x86-64 ELF file as the sites stage sees it, under the path it was asked by.

    Compared by identity: it is a view of a cache entry, not a value.
    """

    __slots__ = ("path", "_core")

    def __init__(self, path: str, core: _Core) -> None:
        self.path = path
        self._core = core

    def with_path(self, path: str) -> ElfImage:
        return ElfImage(path, self._core)

    def __repr__(self) -> str:
        return f"ElfImage({self.path!r}, {len(self.table)} functions from {self.symbol_source})"

    # -- facts -------------------------------------------------------------------

    @property
    def is_pie(self) -> bool:
        """``e_type == ET_DYN``: a PIE executable or a shared object (loaded at a bias)."""
        return self._core.e_type == ET_DYN

    @property
    def stripped(self) -> bool:
        """The file has no ``.symtab`` (its functions may still be named by a debug file)."""
        return self._core.stripped

    @property
    def symbol_source(self) -> str:
        """Where the function names came from, e.g. ``.symtab`` or ``.dynsym + .eh_frame``."""
        return self._core.symbol_source

    @property
    def debug_file(self) -> str | None:
        """The separate debug file whose symbol table was used, if any."""
        return self._core.debug_file

    @property
    def local_names(self) -> bool:
        """Every function has a symbol name (a full symbol table, own or from a debug file)."""
        return self._core.debug_file is not None or not self._core.stripped

    @property
    def table(self) -> FunctionTable:
        return self._core.table

    @property
    def fde_count(self) -> int:
        return self._core.fdes

    @property
    def link_vaddr(self) -> int:
        """Page-rounded ``p_vaddr`` of the PT_LOAD at file offset 0 (for the load bias)."""
        return self._core.link_vaddr

    @property
    def build_id(self) -> bytes | None:
        return self._core.build_id

    @property
    def needed(self) -> tuple[str, ...]:
        """DT_NEEDED: the shared objects this file asks the dynamic loader for."""
        return self._core.needed

    @property
    def runpath(self) -> tuple[str, ...]:
        return self._core.runpath

    @property
    def imports(self) -> frozenset[str]:
        """Names of the undefined functions of ``.dynsym`` (what it calls in other objects)."""
        return self._core.imports

    @property
    def mcount(self) -> np.ndarray:
        """Link-time addresses recorded in ``__mcount_loc`` (uint64, sorted, no zeros)."""
        return self._core.mcount

    @property
    def mcount_locs(self) -> tuple[int, ...]:
        return tuple(self._core.mcount.tolist())

    @property
    def has_mcount_section(self) -> bool:
        return self._core.has_mcount

    @property
    def patchable(self) -> np.ndarray:
        """Link-time addresses recorded in ``__patchable_function_entries`` (uint64, sorted)."""
        return self._core.patchable

    @property
    def patchable_entries(self) -> tuple[int, ...]:
        return tuple(self._core.patchable.tolist())

    @property
    def plt(self) -> dict[int, str]:
        """PLT stub address -> ``"name@plt"``."""
        return self._core.plt

    @property
    def plt_sizes(self) -> dict[int, int]:
        """PLT stub address -> its size in bytes."""
        return self._core.plt_sizes

    @property
    def plt_ranges(self) -> tuple[tuple[int, int], ...]:
        """``(start, end)`` of each PLT section."""
        return self._core.plt_ranges

    @property
    def got_names(self) -> dict[int, str]:
        """GOT slot address -> the function whose address the loader puts there."""
        return self._core.got_names

    @property
    def code(self) -> tuple[CodeSection, ...]:
        return self._core.code

    @property
    def functions(self) -> tuple[Function, ...]:
        """Every function as an object (built on first use; prefer :attr:`table` in bulk)."""
        return _functions(self._core)

    # -- lookups -----------------------------------------------------------------

    def function_at(self, address: int) -> Function | None:
        """The function whose range contains link-time ``address`` (innermost start)."""
        index = self._core.table.index_at(address)
        return None if index < 0 else self._core.table.function(index)

    def function_starting_at(self, address: int) -> Function | None:
        index = self._core.table.index_starting_at(address)
        return None if index < 0 else self._core.table.function(index)

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

    def in_plt(self, address: int) -> bool:
        return any(start <= address < end for start, end in self._core.plt_ranges)

    def name_of(self, address: int) -> str | None:
        """Symbolic name of a link-time address: ``f``, ``f@plt``, ``f+0x1c`` or None."""
        table = self._core.table
        index = table.index_starting_at(address)
        if index >= 0:
            return table.name(index)
        stub = self._core.plt.get(address)
        if stub is not None:
            return stub
        index = table.index_at(address)
        if index >= 0:
            return f"{table.name(index)}+{address - int(table.starts[index]):#x}"
        return None

    def names_of(self, address: int) -> tuple[str, ...]:
        """Every name ``address`` answers to (for glob matching): aliases, ``f@plt`` and ``f``."""
        table = self._core.table
        index = table.index_starting_at(address)
        if index >= 0:
            return table.names(index)
        stub = self._core.plt.get(address)
        if stub is not None:
            return self._core.plt_names[address]
        name = self.name_of(address)
        return (name,) if name is not None else ()


def _functions(core: _Core) -> tuple[Function, ...]:
    cached = core.__dict__.get("_functions")
    if cached is None:
        table = core.table
        cached = tuple(table.function(i) for i in range(len(table)))
        core.__dict__["_functions"] = cached
    return cached


# -- reading ------------------------------------------------------------------

_cache: OrderedDict[tuple[int, int, int, int], _Core] = OrderedDict()
_cache_lock = threading.Lock()


def open_elf(path: str | os.PathLike[str], *, real_path: str | None = None) -> ElfImage:
    """Read ``path`` (cached by file identity); refuse anything but an x86-64 ELF.

    ``real_path`` is where the file lives when ``path`` is a ``/proc/PID/map_files``
    link (a ``.gnu_debuglink`` debug file is looked for beside it).
    """
    display = os.fspath(path)
    try:
        st = os.stat(display)
    except FileNotFoundError as exc:
        raise ElfError(f"no such file: {display}", hint="give a path to an ELF binary or a pid") from exc
    except OSError as exc:
        raise ElfError(f"cannot read {display}: {exc.strerror}") from exc
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _cache_lock:  # a capture reads symbols in a thread of its own
        core = _cache.get(key)
        if core is not None:
            _cache.move_to_end(key)
            if display not in core.paths:
                core.paths.append(display)
                del core.paths[:-4]
            return ElfImage(display, core)
    core = _load(display, key, real_path or display)  # unlocked: two threads may read one file
    with _cache_lock:
        core = _cache.setdefault(key, core)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return ElfImage(display, core)


def _load(path: str, key: tuple[int, int, int, int], real_path: str) -> _Core:
    try:
        with open_file(path) as elf:
            return _read(elf, key, real_path)
    except ElfError:
        raise
    except OSError as exc:
        raise ElfError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (struct.error, ValueError, IndexError, EhFrameError) as exc:
        raise ElfError(
            f"{path} is a corrupt or truncated ELF file: {exc}",
            hint="textpoke reads x86-64 ELF executables and shared objects",
        ) from exc


def _symbols(elf: ElfFile, section: Section) -> tuple[np.ndarray, bytes]:
    """The raw entries of a symbol table (index order) and its string table."""
    strtab = elf.linked(section)
    data = elf.data(section)
    usable = len(data) - len(data) % SYM_DTYPE.itemsize
    return np.frombuffer(data[:usable], dtype=SYM_DTYPE), (elf.data(strtab) if strtab is not None else b"")


def _strings(strtab: bytes, offsets: np.ndarray) -> list[str]:
    """The NUL-terminated strings at ``offsets`` of ``strtab``."""
    if not len(offsets):
        return []
    raw = np.frombuffer(strtab, dtype=np.uint8)
    nul = np.flatnonzero(raw == 0)
    offsets = offsets.astype(np.int64)
    where = search(nul, offsets)
    ends = np.where(where < len(nul), nul[np.minimum(where, len(nul) - 1)], len(strtab))
    decode = bytes.decode
    return [decode(strtab[a:b], "utf-8", "replace") for a, b in zip(offsets.tolist(), ends.tolist())]


def _function_symbols(elf: ElfFile, section: Section | None, origin: int) -> Named | None:
    if section is None:
        return None
    symbols, strtab = _symbols(elf, section)
    exec_indices = np.asarray([s.index for s in elf.sections if s.executable], dtype=np.int64)
    kind = symbols["info"] & 0xF
    shndx = symbols["shndx"].astype(np.int64)
    keep = (kind == _STT_FUNC) & (symbols["name"] != 0) & (shndx > 0) & (shndx < _SHN_LORESERVE)
    keep &= np.isin(shndx, exec_indices)
    chosen = symbols[keep]
    names = _strings(strtab, chosen["name"])
    return Named(chosen["value"].astype(np.uint64), chosen["size"].astype(np.uint64),
                  (chosen["info"] >> 4).astype(np.uint8), names, origin)


def _debug_symbols(elf: ElfFile, real_path: str) -> tuple[Named | None, str | None]:
    """Function symbols of the separate debug file of ``elf``, and its path."""
    debug = find_debug_file(elf, real_path)
    if debug is None:
        return None, None
    with debug:
        found = _function_symbols(debug, next(s for s in debug.sections if s.type == SHT_SYMTAB), Origin.DEBUG)
    return (found, debug.path) if found is not None and found.names else (None, None)


def _read(elf: ElfFile, key: tuple[int, int, int, int], real_path: str) -> _Core:
    if elf.e_type not in (ET_EXEC, ET_DYN):
        raise ElfError(
            f"{elf.path} is an ELF file of type {elf.type_name}, not an executable or shared object",
            hint="link the object first; sites are found in linked binaries",
        )
    exec_sections = tuple(s for s in elf.sections if s.executable and s.size > 0 and s.type != SHT_NOBITS)
    for section in exec_sections:
        elf.check_inside(section)
    symtab = next((s for s in elf.sections if s.type == SHT_SYMTAB), None)
    dynsym = next((s for s in elf.sections if s.type == SHT_DYNSYM), None)
    dyn = np.zeros(0, dtype=SYM_DTYPE)
    dyn_strtab = b""
    if dynsym is not None:
        dyn, dyn_strtab = _symbols(elf, dynsym)

    # Names: the best symbol table there is, plus the exported ones without it.
    sources: list[Named] = []
    debug_file = None
    parts: list[str] = []
    own = _function_symbols(elf, symtab, Origin.SYMTAB)
    if own is not None and own.names:
        sources.append(own)
        parts.append(".symtab")
    else:
        try:
            found, debug_path = _debug_symbols(elf, real_path)
        except (ElfError, OSError, ValueError, IndexError, struct.error):
            found, debug_path = None, None  # a broken debug file is no debug file
        if found is not None and debug_path is not None:
            sources.append(found)
            debug_file = debug_path
            parts.append(f".symtab of {debug_path}")
        if debug_file is None:
            try:
                mini = mini_debuginfo(elf)
                found = None if mini is None else _function_symbols(
                    mini, next(s for s in mini.sections if s.type == SHT_SYMTAB), Origin.DEBUG)
            except (ElfError, ValueError, IndexError, struct.error):
                found = None
            if found is not None and found.names:
                sources.append(found)
                parts.append(".gnu_debugdata")
            exported = _function_symbols(elf, dynsym, Origin.DYNSYM)
            if exported is not None and exported.names:
                sources.append(exported)
                parts.insert(0, ".dynsym")

    plt_ranges = tuple(
        (s.addr, s.end) for name in PLT_SECTIONS if (s := elf.section(name)) is not None and s.size
    )
    fde_starts = fde_ends = np.zeros(0, dtype=np.uint64)
    fdes = 0
    eh = elf.section(".eh_frame")
    if eh is not None and eh.type != SHT_NOBITS and eh.size:
        hdr = elf.section(".eh_frame_hdr")
        header = elf.data(hdr) if hdr is not None and hdr.type != SHT_NOBITS else b""
        fde_starts, fde_ends = fde_ranges(elf.data(eh), eh.addr, header=header,
                                          header_address=hdr.addr if hdr is not None else 0)
        fdes = len(fde_starts)
        # Only FDEs of code in an executable section, and not the PLT's own FDEs.
        ok = np.zeros(len(fde_starts), dtype=bool)
        for s in exec_sections:
            ok |= (fde_starts >= s.addr) & (fde_ends <= s.end)
        for start, end in plt_ranges:
            ok &= ~((fde_starts >= start) & (fde_starts < end))
        fde_starts, fde_ends = fde_starts[ok], fde_ends[ok]
    table = merge(sources, fde_starts, fde_ends)
    if len(table) and (table.origin == Origin.EH_FRAME).any():
        parts.append(".eh_frame")

    relas = relocations(elf)
    kind = dyn["info"] & 0xF
    dyn_names: list[str] | None = None
    ifunc_by_resolver: dict[int, str] = {}
    imports: frozenset[str] = frozenset()
    if len(dyn):
        dyn_names = _strings(dyn_strtab, dyn["name"])
        ifuncs = sorted(((dyn_names[i], int(dyn["info"][i] >> 4), int(dyn["value"][i]))
                         for i in np.flatnonzero(kind == _STT_GNU_IFUNC).tolist() if dyn_names[i]),
                        key=lambda t: preference(t[0], t[1]))
        for name, _binding, value in ifuncs:
            ifunc_by_resolver.setdefault(value, name)  # best-ranked alias first
        undefined = np.flatnonzero((dyn["shndx"] == 0) & ((kind == _STT_FUNC) | (kind == 0)))
        imports = frozenset(dyn_names[i] for i in undefined.tolist() if dyn_names[i])
    got = got_names(relas, dyn, dyn_names, ifunc_by_resolver)
    plt_symbols, plt_sizes = plt_names(elf, got)
    return _Core(
        identity=key,
        file_path=elf.path,
        e_type=elf.e_type,
        stripped=symtab is None,
        symbol_source=" + ".join(parts) or "no symbol table",
        debug_file=debug_file,
        table=table,
        fdes=fdes,
        mcount=address_table(elf, elf.section(MCOUNT_SECTION), relas, dyn["value"].astype(np.uint64)),
        has_mcount=elf.section(MCOUNT_SECTION) is not None,
        patchable=address_table(elf, elf.section(PATCHABLE_SECTION), relas, dyn["value"].astype(np.uint64)),
        plt_symbols=plt_symbols,
        plt_sizes=plt_sizes,
        plt_ranges=plt_ranges,
        exec_sections=exec_sections,
        link_vaddr=elf.link_vaddr,
        build_id=elf.build_id,
        needed=tuple(elf.dynamic_strings(1)),
        runpath=tuple(p for tag in (29, 15) for value in elf.dynamic_strings(tag) for p in value.split(":")),
        got_names=got,
        imports=imports,
    )


def clear_cache() -> None:
    """Forget every cached image (tests that rewrite a file in place use it)."""
    _cache.clear()


__all__ = [
    "MCOUNT_SECTION",
    "PATCHABLE_SECTION",
    "PLT_SECTIONS",
    "CodeSection",
    "ElfImage",
    "Function",
    "FunctionTable",
    "Origin",
    "clear_cache",
    "open_elf",
]
