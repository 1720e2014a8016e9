"""Every function of a running process, in bulk: address ranges and names.

:func:`symbol_ranges` covers the main executable and every shared object
mapped executable in the process, at runtime addresses: functions from
``.symtab``, a separate debug file, ``.dynsym`` or ``.eh_frame`` (``sub_<link
address>``, the same name ``textpoke sites`` shows), and PLT stubs
(``malloc@plt``), C++ names demangled.  It returns three arrays and builds
no object per symbol beyond the name strings themselves; each file is read
once per file identity (the ELF cache of :mod:`.elf`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._errors import TextpokeError
from ..target.maps import Mapping, load_base, read_maps
from .elf import ElfImage, open_elf
from .functions import search


class SymbolRanges(NamedTuple):
    """Function ranges of a process, sorted by start: ``starts[i] <= a < ends[i]`` is ``names[i]``."""

    starts: np.ndarray  # uint64
    ends: np.ndarray  # uint64
    names: np.ndarray  # object (str)

    def lookup(self, addresses: np.ndarray) -> np.ndarray:
        """Index of the range holding each address, -1 where none does."""
        addresses = np.asarray(addresses, dtype=np.uint64)
        index = search(self.starts, addresses, side="right").astype(np.int64) - 1
        clipped = np.maximum(index, 0)
        inside = (index >= 0) & (addresses < self.ends[clipped]) if len(self.ends) else index < -1
        return np.where(inside, index, -1)


def _executable_objects(maps: list[Mapping]) -> dict[str, list[Mapping]]:
    """File-backed objects with at least one executable mapping, by path."""
    objects: dict[str, list[Mapping]] = {}
    for m in maps:
        if m.inode != 0 and m.path.startswith("/") and not m.path.startswith("/memfd:"):
            objects.setdefault(m.file_path, []).append(m)
    return {path: own for path, own in objects.items() if any(m.executable for m in own)}


def _image(pid: int, path: str, own: list[Mapping]) -> tuple[ElfImage, int] | None:
    head = min((m for m in own if m.offset == 0), key=lambda m: m.start, default=None)
    if head is None:
        return None
    for elf_path in (f"/proc/{pid}/map_files/{head.start:x}-{head.end:x}", path):
        try:
            image = open_elf(elf_path, real_path=path)
        except TextpokeError:
            continue
        return image, load_base(own, head.path, link_vaddr=image.link_vaddr)
    return None


def symbol_ranges(pid: int) -> SymbolRanges:
    """Function and PLT-stub ranges of every executable object mapped in ``pid``.

    Runtime addresses; names demangled; objects that cannot be read (not an
    ELF file, no permission) are left out.  Raises :class:`NoSuchProcess` /
    :class:`PermissionDenied` when the maps of ``pid`` cannot be read.
    """
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    names: list[list[str]] = []
    for path, own in _executable_objects(read_maps(pid)).items():
        found = _image(pid, path, own)
        if found is None:
            continue
        image, base = found
        table = image.table
        bias = np.uint64(base % (1 << 64))
        starts.append(table.starts + bias)
        ends.append(np.maximum(table.ends, table.starts + np.uint64(1)) + bias)
        names.append(table.display)
        if image.plt:
            stubs = np.fromiter(image.plt.keys(), dtype=np.uint64, count=len(image.plt))
            sizes = np.fromiter((image.plt_sizes.get(s, 16) for s in image.plt), dtype=np.uint64,
                                count=len(image.plt))
            starts.append(stubs + bias)
            ends.append(stubs + sizes + bias)
            names.append(list(image.plt.values()))
    if not starts:
        return SymbolRanges(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, dtype=object))
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    label = np.empty(len(start), dtype=object)
    label[:] = [n for chunk in names for n in chunk]
    order = np.argsort(start, kind="stable")
    return SymbolRanges(start[order], end[order], label[order])


__all__ = ["SymbolRanges", "symbol_ranges"]
