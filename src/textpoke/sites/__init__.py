"""sites stage of textpoke: which 5-byte sites a binary or a process has, and why safe.

From the ELF (symbols, a separate debug file, ``.eh_frame`` for stripped
binaries, ``__mcount_loc``, PLT stubs) and code decoded with iced-x86 from
known function starts: fentry ``nop5``/``call __fentry__`` at function
entries, and ``call rel32`` / ``jmp rel32`` at instruction boundaries.  See
DEVELOPERS.md for where it sits in the pipeline.
"""

from .discover import (
    DEFAULT_KINDS,
    Site,
    SiteColumns,
    SiteKind,
    SiteScan,
    find_sites,
    scan_sites,
)
from .elf import ElfImage, Function, FunctionTable, open_elf
from .process import (
    MappedObject,
    ProcessScan,
    check_process_site,
    mapped_object,
    scan_process,
    sites_in_process,
)
from .symbols import SymbolRanges, symbol_ranges
from .validate import check_site

__all__ = [
    "DEFAULT_KINDS",
    "ElfImage",
    "Function",
    "FunctionTable",
    "MappedObject",
    "ProcessScan",
    "Site",
    "SiteColumns",
    "SiteKind",
    "SiteScan",
    "SymbolRanges",
    "check_process_site",
    "check_site",
    "find_sites",
    "mapped_object",
    "open_elf",
    "scan_process",
    "scan_sites",
    "sites_in_process",
    "symbol_ranges",
]
