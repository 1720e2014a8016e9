"""sites stage of textpoke: which 5-byte sites a binary or a process has, and why safe.

From the ELF (symbols, ``__mcount_loc``, PLT stubs) and code decoded with
iced-x86: fentry ``nop5`` at function entries, and ``call rel32`` / ``jmp rel32``
at instruction boundaries.  See DEVELOPERS.md for where it sits in the pipeline.
"""

from .discover import DEFAULT_KINDS, Site, SiteKind, SiteScan, find_sites, scan_sites
from .elf import ElfImage, Function, open_elf
from .process import (
    MappedObject,
    ProcessScan,
    check_process_site,
    mapped_object,
    scan_process,
    sites_in_process,
)
from .validate import check_site

__all__ = [
    "DEFAULT_KINDS",
    "ElfImage",
    "Function",
    "MappedObject",
    "ProcessScan",
    "Site",
    "SiteKind",
    "SiteScan",
    "check_process_site",
    "check_site",
    "find_sites",
    "mapped_object",
    "open_elf",
    "scan_process",
    "scan_sites",
    "sites_in_process",
]
